//! The saga definitions a node knows: every version it has seen, and which version of each
//! saga is active (the one new sagas start on).
//!
//! A saga runs to its end on the version it started on (its snapshot records the version's
//! fingerprint), so versions are never replaced, only added; making another version active
//! changes what new sagas start on and nothing else. Shared by the actors and the API behind
//! an `Arc`; reads take a short read lock and clone an `Arc`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::definition::SagaDefinition;

/// Every known version of every saga, and the active one of each.
#[derive(Debug, Default)]
pub struct Catalog {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    active: HashMap<String, Arc<SagaDefinition>>,
    versions: HashMap<(String, u64), Arc<SagaDefinition>>,
}

impl Catalog {
    /// A catalog where each of `definitions` is known and active.
    pub fn new(definitions: impl IntoIterator<Item = Arc<SagaDefinition>>) -> Self {
        let catalog = Catalog::default();
        for def in definitions {
            catalog.activate(def);
        }
        catalog
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent maps (each write is one insert).
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The active version of saga `name`.
    pub fn active(&self, name: &str) -> Option<Arc<SagaDefinition>> {
        self.read().active.get(name).cloned()
    }

    /// Version `fingerprint` of saga `name`, if known here.
    pub fn version(&self, name: &str, fingerprint: u64) -> Option<Arc<SagaDefinition>> {
        self.read()
            .versions
            .get(&(name.to_string(), fingerprint))
            .cloned()
    }

    /// Adds a version (not made active); a known version is kept as it is.
    pub fn insert(&self, def: Arc<SagaDefinition>) -> Arc<SagaDefinition> {
        let mut inner = self.write();
        inner
            .versions
            .entry((def.name.clone(), def.fingerprint))
            .or_insert(def)
            .clone()
    }

    /// Adds a version and makes it the active one of its saga; returns the version it replaced
    /// as active, if another.
    pub fn activate(&self, def: Arc<SagaDefinition>) -> Option<Arc<SagaDefinition>> {
        let def = self.insert(def);
        let mut inner = self.write();
        let before = inner.active.insert(def.name.clone(), def.clone());
        before.filter(|b| b.fingerprint != def.fingerprint)
    }

    /// The active version of every saga, by name.
    pub fn active_all(&self) -> Vec<Arc<SagaDefinition>> {
        let mut all: Vec<Arc<SagaDefinition>> = self.read().active.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// The names of the sagas with an active version, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.read().active.keys().cloned().collect();
        names.sort();
        names
    }

    /// Every known version of saga `name`.
    pub fn versions_of(&self, name: &str) -> Vec<Arc<SagaDefinition>> {
        self.read()
            .versions
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|(_, d)| d.clone())
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::definition::parse;

    fn trip(completed: &str) -> Arc<SagaDefinition> {
        let text = include_str!("../../sagas/trip.toml").replace(
            "completed = \"BOOKED\"",
            &format!("completed = \"{completed}\""),
        );
        Arc::new(parse(&text, Path::new("trip.toml")).unwrap())
    }

    #[test]
    fn versions_are_kept_and_one_is_active() {
        let v1 = trip("BOOKED");
        let v2 = trip("CONFIRMED");
        let catalog = Catalog::new([v1.clone()]);
        assert_eq!(catalog.active("trip").unwrap().fingerprint, v1.fingerprint);
        assert_eq!(
            catalog.activate(v2.clone()).unwrap().fingerprint,
            v1.fingerprint
        );
        assert_eq!(catalog.active("trip").unwrap().fingerprint, v2.fingerprint);
        // The old version still runs the sagas that started on it.
        assert!(catalog.version("trip", v1.fingerprint).is_some());
        assert_eq!(catalog.versions_of("trip").len(), 2);
        // Activating the active version again replaces nothing; rollback is an activation.
        assert!(catalog.activate(v2.clone()).is_none());
        assert!(catalog.activate(v1.clone()).is_some());
        assert_eq!(catalog.active("trip").unwrap().fingerprint, v1.fingerprint);
        assert_eq!(catalog.names(), ["trip"]);
        assert!(catalog.version("trip", 7).is_none() && catalog.active("order").is_none());
    }
}
