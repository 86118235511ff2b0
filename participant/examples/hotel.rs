//! The trip saga's `hotel` service (book, cancel), exactly once through the ledger. Next to
//! `sagaflow dev`: `cargo run -p sagaflow-participant --example hotel -- nats://127.0.0.1:4222`
use sagaflow_participant::ledger::{Entry, Ledger};
use sagaflow_participant::{async_trait, Command, Handler, Outcome, Runner, Unavailable};

/// Books rooms; the room number is the ledger entry's detail.
pub struct Hotel {
    /// Where bookings are recorded.
    pub ledger: Ledger<u32>,
}

/// A booking of `nights` nights: its outcome and room (numbered by the nights, for the demo).
fn book(nights: Option<u64>) -> (Outcome, u32) {
    match nights {
        Some(0) | None => (Outcome::failure("invalid", "nights must be 1 or more"), 0),
        Some(n) if n > 30 => (Outcome::failure("sold_out", "no room that long"), 0),
        Some(n) => (Outcome::success(format!(r#"{{"room":{n}}}"#)), n as u32),
    }
}

#[async_trait]
impl Handler for Hotel {
    async fn handle(&self, cmd: &Command) -> Result<Outcome, Unavailable> {
        let input: serde_json::Value = serde_json::from_slice(&cmd.input).unwrap_or_default();
        let (ledger, nights) = (&self.ledger, input["nights"].as_u64());
        match cmd.action.as_str() {
            "book" => ledger.forward(cmd, || async { Ok(book(nights)) }).await,
            "cancel" => {
                let undo = |booked: Option<Entry<u32>>| async move {
                    let room = booked.map_or(0, |b| b.detail);
                    Ok((Outcome::success(format!(r#"{{"freed":{room}}}"#)), room))
                };
                ledger.compensate(cmd, "book", undo).await
            }
            other => Ok(Outcome::failure("invalid", other)),
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let url = std::env::args()
        .nth(1)
        .unwrap_or("nats://127.0.0.1:4222".into());
    let js = async_nats::jetstream::new(async_nats::connect(url).await?);
    let hotel = Hotel {
        ledger: Ledger::open(&js, "hotel_ledger", 1).await?,
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let running = Runner::new(js, "hotel", hotel)
        .instances(8)
        .start(cancel)
        .await?;
    tokio::signal::ctrl_c().await?;
    running.shutdown().await;
    Ok(())
}
