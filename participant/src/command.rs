//! What a command must be before a participant acts on it or answers it, and the key a
//! compensation undoes.

use sagaflow_proto::ids;
use sagaflow_proto::subjects::{command_id, CONTROL_KINDS};
use sagaflow_proto::v1;

/// Checks what of a command reaches a subject or a header: the saga id, the step, the
/// `command_id` (the reply's `Nats-Msg-Id`) and the `reply_subject` (where the reply is
/// published: only this service's reply subject, `sagaflow.evt.<partition>.reply.<service>`,
/// or the older `sagaflow.evt.<partition>.reply` that names no service). A command that fails
/// is dead-lettered, never answered: answering it could publish anywhere.
pub fn check_command(cmd: &v1::Command) -> Result<(), String> {
    if let Some(problem) = ids::saga_id_problem(&cmd.saga_id) {
        return Err(format!("command's {problem}"));
    }
    if !ids::valid_id(&cmd.step, ids::MAX_STEP_NAME) || cmd.attempt == 0 {
        return Err(format!(
            "command's step {} or attempt {} is not well-formed",
            ids::quote(&cmd.step),
            cmd.attempt
        ));
    }
    let expected = command_id(&cmd.saga_id, &cmd.step, cmd.compensation, cmd.attempt);
    if cmd.command_id != expected {
        return Err(format!(
            "command's command_id {} is not the id of the attempt it names (`{expected}`)",
            ids::quote(&cmd.command_id)
        ));
    }
    // Older nodes named the saga in the subject too (a 5-token subject): still a saga event
    // subject.
    // A partition is digits only (`u32::from_str` would also take `+5`, a subject no
    // partition consumer reads).
    let partition = |p: &str| {
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u32>().is_ok()
    };
    let reply_to_event = match cmd.reply_subject.split('.').collect::<Vec<_>>().as_slice() {
        ["sagaflow", "evt", p, "reply", service]
            if !CONTROL_KINDS.contains(service) && *service != "reply" =>
        {
            if *service != cmd.service {
                return Err(format!(
                    "command's reply_subject {} is another service's (this command is for `{}`)",
                    ids::quote(&cmd.reply_subject),
                    cmd.service
                ));
            }
            partition(p)
        }
        ["sagaflow", "evt", p, "reply"] => partition(p),
        ["sagaflow", "evt", p, id, "reply"] => partition(p) && ids::valid_saga_id(id),
        _ => false,
    };
    if !reply_to_event {
        return Err(format!(
            "command's reply_subject {} is not a saga reply subject (`sagaflow.evt.<partition>.reply.<service>`)",
            ids::quote(&cmd.reply_subject)
        ));
    }
    Ok(())
}

/// The forward key a compensation undoes: `compensates_key`, else the idempotency key without
/// its `/compensate` suffix. `None` for a forward command (or a compensation naming neither).
pub fn forward_key(cmd: &v1::Command) -> Option<String> {
    if !cmd.compensates_key.is_empty() {
        return Some(cmd.compensates_key.clone());
    }
    cmd.idempotency_key
        .strip_suffix("/compensate")
        .filter(|k| !k.is_empty())
        .map(str::to_string)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use sagaflow_proto::subjects::{idempotency_key, reply_subject};

    fn command() -> v1::Command {
        v1::Command {
            command_id: command_id("trip-1", "book_hotel", false, 1),
            idempotency_key: idempotency_key("trip-1", "book_hotel", false),
            saga_id: "trip-1".into(),
            saga_name: "trip".into(),
            step: "book_hotel".into(),
            service: "hotel".into(),
            action: "book".into(),
            attempt: 1,
            reply_subject: reply_subject(3, "hotel"),
            ..Default::default()
        }
    }

    #[test]
    fn well_formed_commands_pass_and_forged_ones_do_not() {
        assert_eq!(check_command(&command()), Ok(()));
        let older = v1::Command {
            reply_subject: "sagaflow.evt.3.reply".into(),
            ..command()
        };
        assert_eq!(check_command(&older), Ok(()));
        let forged = [
            v1::Command {
                reply_subject: reply_subject(3, "payment"),
                ..command()
            },
            v1::Command {
                reply_subject: "$JS.API.STREAM.DELETE.SAGA_EVENTS".into(),
                ..command()
            },
            v1::Command {
                reply_subject: "sagaflow.evt.+5.reply".into(),
                ..command()
            },
            v1::Command {
                command_id: "trip-1/book_hotel/1\r\nPUB x 1".into(),
                ..command()
            },
            v1::Command {
                saga_id: "Z".repeat(5_000),
                ..command()
            },
            v1::Command {
                attempt: 0,
                ..command()
            },
        ];
        for cmd in forged {
            let why = check_command(&cmd).unwrap_err();
            assert!(why.starts_with("command's"), "{why}");
            assert!(!why.chars().any(char::is_control), "{why:?}");
        }
    }

    #[test]
    fn forward_key_prefers_compensates_key() {
        let mut cmd = v1::Command {
            idempotency_key: "order-A1/charge/compensate".into(),
            ..Default::default()
        };
        assert_eq!(forward_key(&cmd).as_deref(), Some("order-A1/charge"));
        cmd.compensates_key = "x/y".into();
        assert_eq!(forward_key(&cmd).as_deref(), Some("x/y"));
        let plain = v1::Command {
            idempotency_key: "order-A1/charge".into(),
            ..Default::default()
        };
        assert_eq!(forward_key(&plain), None);
    }
}
