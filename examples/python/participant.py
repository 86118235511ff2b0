#!/usr/bin/env python3
"""A Sagaflow participant in Python: the trip saga's `identity`, `flight` and `hotel` services.

It follows the participant contract of docs/participants.md:

- one durable pull consumer per service, `svc-<service>` on the stream `SAGA_COMMANDS`, created
  with the documented settings if it does not exist yet, shared by every instance;
- commands and replies are the protobuf messages of proto/sagaflow/v1/participant.proto, compiled
  at start with grpcio-tools' protoc (nothing generated is kept in the repository);
- a ledger of final outcomes per service in the NATS KV bucket `svc_<service>`, keyed by the
  command's `idempotency_key`: a repeat is answered with what was recorded, `unavailable` is never
  recorded, and a compensation that finds nothing to undo voids the forward key first (rule 4);
- the reply goes to the command's `reply_subject` through JetStream with
  `Nats-Msg-Id: reply/<command_id>` and the command's trace context, and the command is acked only
  once the reply is stored.

What the services do is pretend: the trip input scripts their answers (see README.md), so that a
test can drive a saga to each of its endings.

    python participant.py --nats nats://127.0.0.1:4222 --services identity,flight,hotel

It prints `ready` on stdout once its consumers are bound, logs to stderr, and exits on SIGTERM or
Ctrl-C after the command in hand.
"""

import argparse
import asyncio
import json
import logging
import pathlib
import re
import signal
import sys
import tempfile
import time

import nats
import nats.errors
import nats.js.errors
from nats.js import api

log = logging.getLogger("participant")

COMMANDS_STREAM = "SAGA_COMMANDS"
# The consumer settings of docs/participants.md (the ones a Sagaflow node uses).
ACK_WAIT_S = 30
MAX_DELIVER = 20
MAX_ACK_PENDING = 20_000
# Each pull waits at most this long, so that on SIGTERM the loop ends soon without leaving a pull
# request on the server (a command handed to a gone instance waits ack_wait before another gets it).
PULL_WAIT_S = 2.0
# Failure kinds that are worth retrying: never recorded in the ledger (rule 3).
TRANSIENT = {"unavailable", "timeout"}
# Overwrites of a ledger key would stay visible in its history; there are none: every write is a
# create, which fails when the key is taken.
LEDGER_HISTORY = 10

# `sagaflow.evt.<partition>.reply.<service>`; older nodes sent `sagaflow.evt.<partition>.reply`.
REPLY_SUBJECT = re.compile(r"sagaflow\.evt\.[0-9]+\.reply(?:\.(?P<service>[A-Za-z0-9_-]+))?")
# `<saga_id>/<step>` or `<saga_id>/<step>/compensate`: saga ids and steps are [A-Za-z0-9_-].
IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9_-]+/[A-Za-z0-9_-]+(?:/compensate)?")
TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


class Failure(Exception):
    """A failed step: `kind` is what the saga definition's retry policy looks at."""

    def __init__(self, kind, message):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


# --------------------------------------------------------------------------------------------
# The work. Replace these two functions with real calls to an airline, a hotel channel manager…
# --------------------------------------------------------------------------------------------


def do_forward(service, action, attempt, trip):
    """Does a forward action and returns its output (JSON-able), or raises Failure.

    Scripted by the trip input: `"<service>": "<kind>"` makes every forward action of the service
    fail with that kind; `"<service>_flaky": N` makes its first N attempts answer `unavailable`.
    """
    flaky = trip.get(f"{service}_flaky", 0)
    if not isinstance(flaky, int):
        raise Failure("invalid", f"{service}_flaky must be a number of attempts")
    if attempt <= flaky:
        raise Failure("unavailable", f"{service} did not answer (attempt {attempt} of {flaky} scripted)")
    if trip.get(service):
        raise Failure(str(trip[service]), f"{service}.{action} refused (scripted by the trip input)")
    traveller = trip.get("traveller", "")
    if (service, action) == ("identity", "verify"):
        return {"verified": traveller}
    if (service, action) == ("flight", "hold"):
        return {"held": f"{trip.get('from', '')}-{trip.get('to', '')}", "traveller": traveller}
    if (service, action) == ("flight", "issue_tickets"):
        return {"ticketed": f"{trip.get('from', '')}-{trip.get('to', '')}", "traveller": traveller}
    if (service, action) == ("hotel", "book"):
        return {"booked_nights": trip.get("nights", 1), "traveller": traveller}
    raise Failure("invalid", f"{service} has no action {action!r}")


def do_undo(service, action, forward_output):
    """Undoes a forward action that succeeded with `forward_output` (release, cancel)."""
    return {"undone": action, "of": forward_output}


# --------------------------------------------------------------------------------------------
# The contract: ledger, consumer, reply, ack.
# --------------------------------------------------------------------------------------------


class Ledger:
    """Final outcomes by idempotency key, in one KV bucket per service (rules 3 and 4).

    A record is JSON: {"outcome": "success", "output": …} or {"outcome": "failure", "kind": …,
    "message": …} or {"outcome": "voided"}, plus who wrote it (saga, step, action, attempt, time).
    """

    def __init__(self, kv):
        self.kv = kv

    async def get(self, key):
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.NotFoundError:
            return None
        return json.loads(entry.value)

    async def record(self, key, record):
        """Records `record` under `key` unless something is there already; returns what is there.

        The KV create is the atomic step: of two instances racing on one key, one record wins and
        both answer with it.
        """
        try:
            await self.kv.create(key, json.dumps(record).encode())
            return record
        except nats.js.errors.KeyWrongLastSequenceError:
            return await self.get(key)


def check(cmd, service):
    """Why a command must be refused (None when it may be handled and answered)."""
    if cmd.service != service:
        return f"command is for service {cmd.service!r}, not {service!r}"
    m = REPLY_SUBJECT.fullmatch(cmd.reply_subject)
    if not m:
        return f"reply_subject {cmd.reply_subject!r} is not sagaflow.evt.<partition>.reply.<service>"
    if m["service"] not in (None, service):
        return f"reply_subject {cmd.reply_subject!r} is another service's"
    if not cmd.command_id or cmd.attempt < 1:
        return "command lacks command_id or attempt"
    if not IDEMPOTENCY_KEY.fullmatch(cmd.idempotency_key):
        return f"idempotency_key {cmd.idempotency_key!r} is not <saga_id>/<step>"
    if cmd.compensation and not IDEMPOTENCY_KEY.fullmatch(cmd.compensates_key):
        return f"compensates_key {cmd.compensates_key!r} is not <saga_id>/<step>"
    return None


class Service:
    """One service: its consumer, its ledger, and the loop that answers its commands."""

    def __init__(self, js, pb, name):
        self.js = js
        self.pb = pb
        self.name = name
        self.consumer = f"svc-{name}"
        self.ledger = None
        self.sub = None

    async def bind(self):
        """Opens (or creates) the ledger bucket and the durable consumer, and subscribes."""
        bucket = f"svc_{self.name}"
        try:
            kv = await self.js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            kv = await self.js.create_key_value(
                bucket=bucket, history=LEDGER_HISTORY, description=f"idempotency ledger of {self.name}"
            )
        self.ledger = Ledger(kv)
        try:
            await self.js.consumer_info(COMMANDS_STREAM, self.consumer)
        except nats.js.errors.NotFoundError:
            await self.js.add_consumer(
                COMMANDS_STREAM,
                api.ConsumerConfig(
                    # `name` too: nats-py then uses the create request that carries the filter,
                    # the one a service's NATS user may send (docs/security.md).
                    name=self.consumer,
                    durable_name=self.consumer,
                    description=f"consumer group of the `{self.name}` participant service",
                    filter_subject=f"sagaflow.cmd.{self.name}.>",
                    ack_policy=api.AckPolicy.EXPLICIT,
                    ack_wait=ACK_WAIT_S,
                    max_deliver=MAX_DELIVER,
                    max_ack_pending=MAX_ACK_PENDING,
                    deliver_policy=api.DeliverPolicy.ALL,
                ),
            )
            log.info("created consumer %s on %s", self.consumer, COMMANDS_STREAM)
        # Deliveries come to an inbox under the connection's prefix (--inbox-prefix).
        self.sub = await self.js.pull_subscribe_bind(durable=self.consumer, stream=COMMANDS_STREAM)

    async def run(self, stop):
        """Answers commands one at a time until `stop` is set."""
        while not stop.is_set():
            try:
                msgs = await self.sub.fetch(1, timeout=PULL_WAIT_S)
            except asyncio.TimeoutError:
                continue
            except nats.errors.Error as e:
                log.warning("%s: pull failed (%s); retrying", self.consumer, e)
                await asyncio.sleep(1)
                continue
            for msg in msgs:
                try:
                    await self.handle(msg)
                except nats.errors.Error as e:  # the ack or term did not go out: it comes back
                    log.warning("%s: lost contact with NATS (%s)", self.consumer, e)

    async def handle(self, msg):
        try:
            cmd = self.pb.Command.FromString(msg.data)
        except Exception as e:  # protobuf's DecodeError, or anything a bad payload raises
            log.error("%s: undecodable command (%s): refused", self.consumer, e)
            await msg.term()
            return
        problem = check(cmd, self.name)
        if problem:
            # Never answered: a reply published there is refused by NATS permissions or
            # dead-lettered by the orchestrator. `term` stops the redeliveries; the step times out.
            log.error("%s: refused command %r: %s", self.consumer, cmd.command_id, problem)
            await msg.term()
            return
        try:
            record = await self.decide(cmd)
        except nats.errors.Error as e:
            # The ledger cannot be read or written now: no answer; the command comes back (rule 6).
            log.warning("%s: ledger unavailable (%s); command %s returned", self.consumer, e, cmd.command_id)
            await self.nak(msg)
            return
        try:
            await self.js.publish(cmd.reply_subject, self.reply(cmd, record), headers=self.headers(cmd, msg))
        except nats.errors.Error as e:
            log.warning("%s: reply to %s not stored (%s); command returned", self.consumer, cmd.command_id, e)
            await self.nak(msg)
            return
        # Only now, with the reply stored: a crash before this line means a redelivery, answered
        # the same way from the ledger (and the reply de-duplicated by its Nats-Msg-Id).
        await msg.ack()
        outcome = record["outcome"] if record["outcome"] != "failure" else f"failure {record['kind']}"
        log.info("%s.%s %s attempt %d: %s", self.name, cmd.action, cmd.idempotency_key, cmd.attempt, outcome)

    async def decide(self, cmd):
        """The outcome of a command: what the ledger has under its key, else the work's result."""
        known = await self.ledger.get(cmd.idempotency_key)
        if known is not None:
            return known  # a retry or a redelivery: the first answer again (rule 3)
        if cmd.compensation:
            return await self.compensate(cmd)
        try:
            output = do_forward(self.name, cmd.action, cmd.attempt, trip_input(cmd))
            record = {"outcome": "success", "output": output}
        except Failure as f:
            record = {"outcome": "failure", "kind": f.kind, "message": f.message}
            if f.kind in TRANSIENT:
                return record  # answered, never recorded: the retry must be able to succeed
        return await self.ledger.record(cmd.idempotency_key, stamped(record, cmd))

    async def compensate(self, cmd):
        forward = await self.ledger.get(cmd.compensates_key)
        if forward is None:
            # The forward command's outcome is unknown to the saga (it timed out) and it has not
            # been applied here: void its key first, so that if it arrives late it is refused (rule 4).
            forward = await self.ledger.record(cmd.compensates_key, stamped({"outcome": "voided"}, cmd))
        if forward["outcome"] == "success":
            output = do_undo(self.name, cmd.action, forward.get("output"))
        else:
            output = {"undone": None, "why": f"nothing to undo: the step was {forward['outcome']}"}
        record = {"outcome": "success", "output": output}
        return await self.ledger.record(cmd.idempotency_key, stamped(record, cmd))

    def reply(self, cmd, record):
        reply = self.pb.Reply(
            command_id=cmd.command_id,
            saga_id=cmd.saga_id,
            step=cmd.step,
            attempt=cmd.attempt,
            compensation=cmd.compensation,
        )
        if record["outcome"] == "success":
            reply.success.CopyFrom(self.pb.Success(output=json.dumps(record.get("output")).encode()))
        elif record["outcome"] == "voided":
            reply.failure.CopyFrom(
                self.pb.Failure(kind="voided", message="compensated before it was applied")
            )
        else:
            reply.failure.CopyFrom(self.pb.Failure(kind=record["kind"], message=record["message"]))
        return reply.SerializeToString()

    def headers(self, cmd, msg):
        headers = {"Nats-Msg-Id": f"reply/{cmd.command_id}"}
        # Trace context: this example makes no spans of its own, so it returns the command's
        # (a missing or malformed header is only left out: it is telemetry).
        received = msg.headers or {}
        if TRACEPARENT.fullmatch(received.get("traceparent", "")):
            headers["traceparent"] = received["traceparent"]
            if received.get("tracestate"):
                headers["tracestate"] = received["tracestate"]
        return headers

    async def nak(self, msg):
        try:
            await msg.nak(delay=1)
        except nats.errors.Error as e:
            log.warning("%s: nak failed (%s): the command comes back after ack_wait", self.consumer, e)


def trip_input(cmd):
    """The saga input, a JSON object (a failure of kind `invalid` otherwise)."""
    try:
        trip = json.loads(cmd.input or b"{}")
        if isinstance(trip, dict):
            return trip
    except ValueError:
        pass
    raise Failure("invalid", "the trip input is not a JSON object of the documented fields")


def stamped(record, cmd):
    """`record` with who wrote it, for people reading the ledger."""
    return {
        **record,
        "saga_id": cmd.saga_id,
        "step": cmd.step,
        "action": f"{cmd.service}.{cmd.action}",
        "attempt": cmd.attempt,
        "command_id": cmd.command_id,
        "at_unix_ms": int(time.time() * 1000),
    }


def load_protos(proto_root, out_dir):
    """Compiles sagaflow/v1/participant.proto into `out_dir` and imports it."""
    from grpc_tools import protoc

    proto = "sagaflow/v1/participant.proto"
    if not (proto_root / proto).is_file():
        sys.exit(f"error: no {proto} under {proto_root} (pass --proto DIR)")
    out_dir.mkdir(parents=True, exist_ok=True)
    if protoc.main(["protoc", f"-I{proto_root}", f"--python_out={out_dir}", proto]) != 0:
        sys.exit(f"error: protoc could not compile {proto_root / proto}")
    sys.path.insert(0, str(out_dir))
    from sagaflow.v1 import participant_pb2

    return participant_pb2


async def main(args):
    services = [s.strip() for s in args.services.split(",") if s.strip()]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    with tempfile.TemporaryDirectory(prefix="sagaflow-proto-") as tmp:
        pb = load_protos(pathlib.Path(args.proto), pathlib.Path(args.proto_out or tmp))
        connect = {"servers": args.nats.split(","), "name": f"python-participant ({','.join(services)})"}
        if args.inbox_prefix:
            connect["inbox_prefix"] = args.inbox_prefix
        nc = await nats.connect(**connect, max_reconnect_attempts=-1)
        js = nc.jetstream()
        while True:
            try:
                await js.stream_info(COMMANDS_STREAM)
                break
            except nats.js.errors.NotFoundError:
                log.info("waiting for stream %s (a Sagaflow node creates it)", COMMANDS_STREAM)
                await asyncio.sleep(1)
                if stop.is_set():
                    return await nc.close()
        workers = [Service(js, pb, name) for name in services]
        for w in workers:
            await w.bind()
        print(f"ready: serving {', '.join(services)}", flush=True)
        await asyncio.gather(*(w.run(stop) for w in workers))
        log.info("stopping")
        # Every reply was stored and every ack written: send what is buffered, then go. (No
        # drain: it would wait for the pull inboxes, which nobody reads any more.)
        await nc.flush()
        await nc.close()


def parse_args():
    here = pathlib.Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nats", default="nats://127.0.0.1:4222", help="NATS URL(s), comma-separated")
    p.add_argument("--services", default="identity,flight,hotel", help="services to serve, comma-separated")
    p.add_argument(
        "--proto", default=str(here.parent.parent / "proto"), help="folder of sagaflow/v1/participant.proto"
    )
    p.add_argument("--proto-out", help="where to write the generated code (default: a temporary folder)")
    p.add_argument("--inbox-prefix", help="NATS inbox prefix; with per-service NATS users, _INBOX_<service>")
    return p.parse_args()


if __name__ == "__main__":
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(main(parse_args()))
