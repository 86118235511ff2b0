//! The demo inventory service: `reserve` takes stock for every item of an order, `release`
//! gives a reservation back.
//!
//! Stock lives in the KV bucket `sagaflow_stock`: key = SKU, value = units left as a decimal
//! string. It is written once from `demo.stock` when a SKU has no entry (a restart keeps the
//! counts) and changed only by compare-and-set on the revision, retried on conflict, so
//! concurrent reservations on any node never oversell.
//!
//! # Order of writes, and the known crash windows
//! - `reserve` decrements the stock first, then records the ledger entry. If the instance
//!   crashes (or the ledger write fails) in between, the redelivered command decrements again:
//!   the stock of the first attempt is lost. This **under-sells, never over-sells**, and is a
//!   known limitation of the demo (a real service would keep the stock and the ledger in one
//!   transaction, or record an intent first).
//! - `release` records its ledger entry first, then returns the stock. A crash in between
//!   leaks that stock (under-selling again) rather than returning it twice.
//! - A reservation that cannot complete (an item short, an unknown SKU, a storage error half
//!   way) gives back what it already took before answering.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use async_trait::async_trait;
use sagaflow_proto::v1;

use super::ledger::{Ledger, LedgerEntry, Recorded, Undo};
use super::{failure, forward_key, unavailable, Error, Knobs, OrderInput};
use crate::topology::ensure_bucket;
use sagaflow_participant::{Handler as Participant, Outcome, Unavailable};

/// Service name.
pub const SERVICE: &str = "inventory";

/// The stock bucket.
pub const STOCK_BUCKET: &str = "sagaflow_stock";

/// Compare-and-set attempts on one SKU before giving up (the command is then retried).
const CAS_ATTEMPTS: usize = 100;

/// Attempts to give stock back when the store fails, before the stock is reported leaked.
const GIVE_BACK_ATTEMPTS: u32 = 5;

/// What taking stock for one item found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Taken.
    Taken,
    /// Not enough left.
    Short {
        /// Units left.
        available: u64,
    },
    /// No such SKU.
    Unknown,
}

/// Units left per SKU.
#[derive(Clone, Debug)]
pub struct Stock {
    /// Where the units are kept.
    kv: Backing,
    /// Per SKU: a lock that serialises this node's updates of that SKU (so its own instances
    /// never race each other's compare-and-set) and the last (units, revision) it read or
    /// wrote, so a take needs no read while no other node wrote the SKU. Correctness still
    /// rests on the compare-and-set: a stale cache only costs a conflict and a re-read.
    skus: Arc<std::sync::Mutex<HashMap<String, Slot>>>,
}

/// Where a [`Stock`] keeps its units. (One per service: the size of the larger variant does
/// not matter, and boxing it would add an indirection to every take.)
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)]
enum Backing {
    /// The stock bucket.
    Kv(kv::Store),
    /// Stateless: the configured units, never taken from.
    Fixed(Arc<BTreeMap<String, u64>>),
}

/// One SKU's lock and cached (units, revision).
type Slot = Arc<tokio::sync::Mutex<Option<(u64, u64)>>>;

impl Stock {
    /// Creates or opens the bucket (`replicas` replicas, history 1).
    pub async fn open(js: &jetstream::Context, replicas: usize) -> Result<Self, Error> {
        let kv = ensure_bucket(
            js,
            kv::Config {
                bucket: STOCK_BUCKET.to_string(),
                description: "demo inventory: units left per SKU".to_string(),
                history: 1,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;
        Ok(Stock {
            kv: Backing::Kv(kv),
            skus: Arc::default(),
        })
    }

    /// Stock that is never taken from: an item is available when `initial` lists at least as
    /// many units of its SKU. Nothing is read or written.
    pub fn stateless(initial: BTreeMap<String, u64>) -> Self {
        Stock {
            kv: Backing::Fixed(Arc::new(initial)),
            skus: Arc::default(),
        }
    }

    fn slot(&self, sku: &str) -> Slot {
        let mut skus = match self.skus.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        skus.entry(sku.to_string()).or_default().clone()
    }

    /// Writes the initial stock of every SKU that has no entry yet; existing counts are kept.
    pub async fn init(&self, initial: &BTreeMap<String, u64>) -> Result<(), Error> {
        let Backing::Kv(kv) = &self.kv else {
            return Ok(());
        };
        for (sku, units) in initial {
            match kv.create(sku, units.to_string().into()).await {
                Ok(_) => tracing::debug!(sku, units, "stock initialised"),
                Err(e) if crate::topology::create_conflict(&e) => {}
                Err(e) => {
                    return Err(Error::Storage {
                        operation: "initialise stock",
                        message: format!("{sku}: {e}"),
                    })
                }
            }
        }
        Ok(())
    }

    /// Units left of `sku` with the entry's revision (`None` for an unknown SKU).
    async fn read(&self, sku: &str) -> Result<Option<(u64, u64)>, Unavailable> {
        let kv = match &self.kv {
            Backing::Kv(kv) => kv,
            Backing::Fixed(initial) => return Ok(initial.get(sku).map(|units| (*units, 0))),
        };
        let entry = kv
            .entry(sku)
            .await
            .map_err(|e| unavailable("read stock")(&e))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let units = std::str::from_utf8(&e.value)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or_else(|| Unavailable(format!("corrupt stock entry `{sku}`")))?;
                Ok(Some((units, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Units left of `sku`.
    pub async fn units(&self, sku: &str) -> Result<Option<u64>, Unavailable> {
        Ok(self.read(sku).await?.map(|(units, _)| units))
    }

    /// Takes `quantity` units of `sku` if that many are left.
    pub async fn take(&self, sku: &str, quantity: u32) -> Result<Take, Unavailable> {
        if !valid_sku(sku) {
            return Ok(Take::Unknown);
        }
        let kv = match &self.kv {
            Backing::Kv(kv) => kv,
            Backing::Fixed(initial) => {
                return Ok(match initial.get(sku) {
                    None => Take::Unknown,
                    Some(&units) if units < u64::from(quantity) => Take::Short { available: units },
                    Some(_) => Take::Taken,
                })
            }
        };
        let slot = self.slot(sku);
        let mut cached = slot.lock().await;
        for _ in 0..CAS_ATTEMPTS {
            let (units, revision, fresh) = match *cached {
                Some((units, revision)) => (units, revision, false),
                None => match self.read(sku).await? {
                    Some((units, revision)) => (units, revision, true),
                    None => return Ok(Take::Unknown),
                },
            };
            let Some(left) = units.checked_sub(u64::from(quantity)) else {
                if fresh {
                    *cached = Some((units, revision));
                    return Ok(Take::Short { available: units });
                }
                // Another node may have given stock back since: look before refusing.
                *cached = None;
                continue;
            };
            match kv.update(sku, left.to_string().into(), revision).await {
                Ok(written) => {
                    *cached = Some((left, written));
                    return Ok(Take::Taken);
                }
                Err(e) if crate::topology::update_conflict(&e) => *cached = None,
                Err(e) => {
                    *cached = None;
                    return Err(unavailable("update stock")(&e));
                }
            }
        }
        Err(Unavailable(format!("stock of `{sku}` too contended")))
    }

    /// Returns `quantity` units of `sku`.
    pub async fn give(&self, sku: &str, quantity: u32) -> Result<(), Unavailable> {
        let Backing::Kv(kv) = &self.kv else {
            return Ok(());
        };
        let slot = self.slot(sku);
        let mut cached = slot.lock().await;
        for _ in 0..CAS_ATTEMPTS {
            let current = match *cached {
                Some(c) => Some(c),
                None => self.read(sku).await?,
            };
            let written = match current {
                None => match kv.create(sku, u64::from(quantity).to_string().into()).await {
                    Ok(rev) => Some((u64::from(quantity), rev)),
                    Err(e) if crate::topology::create_conflict(&e) => None,
                    Err(e) => return Err(unavailable("return stock")(&e)),
                },
                Some((units, revision)) => {
                    let new = units.saturating_add(u64::from(quantity));
                    match kv.update(sku, new.to_string().into(), revision).await {
                        Ok(rev) => Some((new, rev)),
                        Err(e) if crate::topology::update_conflict(&e) => None,
                        Err(e) => {
                            *cached = None;
                            return Err(unavailable("return stock")(&e));
                        }
                    }
                }
            };
            *cached = written;
            if written.is_some() {
                return Ok(());
            }
        }
        Err(Unavailable(format!("stock of `{sku}` too contended")))
    }

    /// Gives `items` back, retrying a few times; what cannot be returned is logged as leaked
    /// (under-selling, see the module docs).
    async fn give_all(&self, items: &[(String, u32)]) {
        for (sku, quantity) in items {
            let mut attempt = 0;
            loop {
                attempt += 1;
                match self.give(sku, *quantity).await {
                    Ok(()) => break,
                    Err(Unavailable(e)) if attempt < GIVE_BACK_ATTEMPTS => {
                        tracing::warn!(sku, quantity, error = %e, attempt, "cannot return stock, retrying");
                        tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                    }
                    Err(Unavailable(e)) => {
                        tracing::error!(sku, quantity, error = %e, "cannot return stock: units leaked");
                        break;
                    }
                }
            }
        }
    }
}

/// Whether `sku` can be a stock key.
fn valid_sku(sku: &str) -> bool {
    !sku.is_empty()
        && !sku.starts_with('.')
        && !sku.ends_with('.')
        && !sku.contains("..")
        && sku
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '/' | '_' | '=' | '.'))
}

/// Units left of `sku` in the stock bucket (`None` for an unknown SKU); for tests and tools.
pub async fn stock(js: &jetstream::Context, sku: &str) -> Result<Option<u64>, Error> {
    let kv = js
        .get_key_value(STOCK_BUCKET)
        .await
        .map_err(|e| Error::Storage {
            operation: "open the stock bucket",
            message: e.to_string(),
        })?;
    Stock {
        kv: Backing::Kv(kv),
        skus: Arc::default(),
    }
    .units(sku)
    .await
    .map_err(|Unavailable(message)| Error::Storage {
        operation: "read stock",
        message,
    })
}

/// The inventory participant.
#[derive(Debug, Clone)]
pub struct Inventory {
    ledger: Ledger,
    stock: Stock,
    knobs: Knobs,
}

impl Inventory {
    /// An inventory service over `stock`, recording into `ledger`.
    pub fn new(ledger: Ledger, stock: Stock, knobs: Knobs) -> Self {
        Inventory {
            ledger,
            stock,
            knobs,
        }
    }

    async fn reserve(&self, cmd: &v1::Command) -> Result<Outcome, Unavailable> {
        if let Some(existing) = self.ledger.get(SERVICE, &cmd.idempotency_key).await? {
            return Ok(existing.outcome.to_outcome());
        }
        let mut entry = LedgerEntry::for_command(SERVICE, "reserve", cmd, Recorded::Voided);
        let items = match OrderInput::parse(&cmd.input) {
            Ok(order) if !order.items.is_empty() => order.item_pairs(),
            Ok(_) => {
                entry.outcome = Recorded::Failure {
                    kind: "invalid".into(),
                    message: "order has no items".into(),
                };
                return self.ledger.record(entry).await;
            }
            Err(message) => {
                entry.outcome = Recorded::Failure {
                    kind: "invalid".into(),
                    message,
                };
                return self.ledger.record(entry).await;
            }
        };
        let mut taken: Vec<(String, u32)> = Vec::with_capacity(items.len());
        let mut refusal = None;
        for (sku, quantity) in &items {
            match self.stock.take(sku, *quantity).await {
                Ok(Take::Taken) => taken.push((sku.clone(), *quantity)),
                Ok(Take::Short { available }) => {
                    refusal = Some(format!("{sku}: {quantity} wanted, {available} left"));
                    break;
                }
                Ok(Take::Unknown) => {
                    refusal = Some(format!("{sku}: unknown sku"));
                    break;
                }
                Err(e) => {
                    self.stock.give_all(&taken).await;
                    return Err(e);
                }
            }
        }
        if let Some(message) = refusal {
            self.stock.give_all(&taken).await;
            entry.outcome = Recorded::Failure {
                kind: "out_of_stock".into(),
                message,
            };
            return self.ledger.record(entry).await;
        }
        let output = serde_json::json!({ "reserved": items.iter().map(|(s, q)| serde_json::json!({"sku": s, "quantity": q})).collect::<Vec<_>>() });
        entry.outcome = Recorded::Success {
            output: output.to_string().into_bytes(),
        };
        entry.detail.items = items;
        // A storage error here leaves the stock taken (see the module docs: under-selling).
        match self.ledger.create(&entry).await? {
            None => Ok(entry.outcome.to_outcome()),
            Some(existing) => {
                // A duplicate or an early release got there first: our stock goes back.
                self.stock.give_all(&entry.detail.items).await;
                Ok(existing.outcome.to_outcome())
            }
        }
    }

    async fn release(&self, cmd: &v1::Command, forward: &str) -> Result<Outcome, Unavailable> {
        let (reservation, mut entry) = match self
            .ledger
            .begin_undo(SERVICE, "reserve", "release", cmd, forward)
            .await?
        {
            Undo::Answered(outcome) => return Ok(outcome),
            Undo::Pending { forward, entry } => (*forward, *entry),
        };
        if entry.undid {
            entry.detail.items = reservation.detail.items;
        }
        let output = serde_json::json!({ "released": entry.detail.items.iter().map(|(s, q)| serde_json::json!({"sku": s, "quantity": q})).collect::<Vec<_>>() });
        entry.outcome = Recorded::Success {
            output: output.to_string().into_bytes(),
        };
        // Ledger first, then the stock: whoever records the release returns the stock, once.
        match self.ledger.create(&entry).await? {
            None => {
                self.stock.give_all(&entry.detail.items).await;
                Ok(entry.outcome.to_outcome())
            }
            Some(existing) => Ok(existing.outcome.to_outcome()),
        }
    }
}

#[async_trait]
impl Participant for Inventory {
    async fn handle(&self, cmd: &v1::Command) -> Result<Outcome, Unavailable> {
        if let Some(early) = crate::demo::precheck(&self.knobs, cmd).await {
            return Ok(early);
        }
        match cmd.action.as_str() {
            "reserve" => self.reserve(cmd).await,
            "release" => match forward_key(cmd) {
                Some(forward) => self.release(cmd, &forward).await,
                None => Ok(failure(
                    "invalid",
                    "release without the key of the reservation it undoes",
                )),
            },
            other => Ok(failure(
                "invalid",
                format!("unknown inventory action `{other}`"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sku_keys_are_checked() {
        assert!(valid_sku("SKU-1"));
        assert!(valid_sku("a.b"));
        for bad in ["", ".a", "a.", "a..b", "a b", "a*", "a>"] {
            assert!(!valid_sku(bad), "{bad:?}");
        }
    }
}
