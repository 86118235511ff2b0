//! Replays the fuzzing corpus (`tests/fuzz/corpus/<target>/*`) through its targets, then runs
//! a short deterministic fuzzing round of each target so the generators and mutators are
//! exercised by every `cargo test`. No NATS needed. See `tests/fuzz/README.md`.

use crate::fuzz;

use fuzz::engine::{self, hex};
use fuzz::targets::{Target, TARGETS};

/// Inputs of the generated round, per target (fewer for the slower state-machine targets, so
/// the whole test stays within a few seconds in a debug build).
fn generated_inputs(target: &Target) -> u64 {
    match target.name {
        "machine" | "adopted" => 300,
        "definition" => 1_000,
        _ => 2_000,
    }
}

/// Every corpus file of `target` runs without a panic and with its properties.
fn replay(target: &Target) {
    let corpus = engine::read_corpus(target.name);
    assert!(
        !corpus.is_empty(),
        "no corpus for `{}` in {}",
        target.name,
        engine::corpus_dir(target.name).display()
    );
    let failures: Vec<String> = corpus
        .iter()
        .filter_map(|(name, bytes)| {
            engine::run_catching(target, bytes)
                .err()
                .map(|crash| format!("{}/{name}: {crash}\n  input: {}", target.name, hex(bytes)))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A fixed-seed round of generated and mutated inputs panics nowhere.
fn generated(target: &Target) {
    let mut pool: Vec<Vec<u8>> = engine::read_corpus(target.name)
        .into_iter()
        .map(|(_, bytes)| bytes)
        .collect();
    let stats = engine::campaign(target, 7, generated_inputs(target), &mut pool, 0, |_| {});
    let crashes: Vec<String> = stats
        .crashes
        .iter()
        .map(|(crash, input)| format!("{crash}\n  minimized input: {}", hex(input)))
        .collect();
    assert!(
        crashes.is_empty(),
        "`{}`: {}",
        target.name,
        crashes.join("\n")
    );
}

macro_rules! target_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let target = fuzz::targets::target(stringify!($name)).expect("a target");
                replay(target);
                generated(target);
            }
        )*
    };
}

target_tests!(events, snapshot, control, command, machine, adopted, definition);

#[test]
fn every_target_is_tested() {
    let tested = [
        "events",
        "snapshot",
        "control",
        "command",
        "machine",
        "adopted",
        "definition",
    ];
    for t in TARGETS {
        assert!(tested.contains(&t.name), "target `{}` has no test", t.name);
    }
}

/// The stored form of an event case reads back as written, whatever its bytes.
#[test]
fn event_cases_round_trip() {
    let case = fuzz::targets::EventCase {
        partitions: 3,
        subject: "sagaflow.evt.1.re\nply\\x00".into(),
        headers: vec![("Sagaflow-Saga-Id".into(), "a\r\nb\u{7f}é".into())],
        payload: b"\n\nbytes\xff".to_vec(),
    };
    assert_eq!(fuzz::targets::EventCase::parse(&case.to_bytes()), case);
}

/// The findings of the fuzzing campaign (`tests/fuzz/README.md`), each reduced to a direct
/// reproduction, now fixed. A new finding goes here with `#[ignore = "open finding …"]` until
/// it is fixed.
mod findings {
    use sagaflow_actors::machine::{Phase, Saga, StepPhase};
    use sagaflow_proto::v1;

    use super::fuzz::targets::definitions;

    /// F1: a command whose `reply_subject` is `sagaflow.evt.+5.reply` passes `check_command`
    /// (`"+5".parse::<u32>()` is `Ok(5)`), so its participant replies on a subject no
    /// partition consumer's filter (`sagaflow.evt.5.>`) matches.
    #[test]
    fn finding_f1_a_signed_partition_is_not_a_reply_subject() {
        let cmd = v1::Command {
            command_id: "order-1/charge/1".into(),
            saga_id: "order-1".into(),
            step: "charge".into(),
            attempt: 1,
            reply_subject: "sagaflow.evt.+5.reply".into(),
            ..Default::default()
        };
        assert!(sagaflow_participant::command::check_command(&cmd).is_err());
    }

    /// A saga of the order definition, compensating along `plan`, whose first step's
    /// compensation (attempt 1) is in flight.
    fn compensating(plan: Vec<u32>) -> Saga {
        let def = &definitions()[0];
        let (mut saga, _) = Saga::start(def, "order-1".into(), b"{}".to_vec(), 0);
        saga.phase = Phase::Compensating;
        saga.steps[0].phase = StepPhase::Compensating;
        saga.steps[0].comp_attempt = 1;
        saga.compensation_plan = Some(plan);
        saga.comp_cursor = 0;
        saga
    }

    /// F2: a snapshot whose compensation plan names a step slot the definition lacks panicked
    /// the machine (index out of bounds in `Saga::next_compensation`), and the coordinator
    /// adopted the snapshot a `Created` event carries when only its id matched. Such a
    /// snapshot is now refused before the machine sees it.
    #[test]
    fn finding_f2_a_plan_naming_a_missing_slot_is_refused() {
        let def = &definitions()[0];
        let saga = compensating(vec![0, 9]);
        let err = saga.consistent_with(def).expect_err("refused");
        assert!(err.contains("step slot 9"), "{err}");
        assert_eq!(compensating(vec![0]).consistent_with(def), Ok(()));
    }

    /// F3: counters at their maximum in a snapshot overflowed (`attempt += 1`, `stage += 1`,
    /// `status_seq += 1`…). Counters near overflow are refused with the snapshot; a saga run
    /// by the machine never gets near them.
    #[test]
    fn finding_f3_counters_near_their_maximum_are_refused() {
        let def = &definitions()[0];
        let mut saga = compensating(vec![0]);
        saga.steps[0].phase = StepPhase::CompensationRetryWait;
        saga.steps[0].comp_attempt = u32::MAX;
        saga.steps[0].due_at = Some(1);
        assert!(saga.consistent_with(def).is_err());
    }
}
