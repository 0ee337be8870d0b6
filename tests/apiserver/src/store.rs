//! Object storage: the objects, the global resource version, the event log that watches replay,
//! and deletion with finalizers, namespace contents and owner-reference garbage collection.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::meta;
use crate::resources::GroupResource;

/// How many events the log keeps for watches that resume from a resource version.
const EVENT_LOG_CAPACITY: usize = 10_000;
/// How many events a watch may fall behind before it is ended with 410 Gone.
const BROADCAST_CAPACITY: usize = 16_384;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One change of one object.
#[derive(Debug)]
pub struct Event {
    pub resource_version: u64,
    pub resource: GroupResource,
    pub kind: EventType,
    /// The object after the change; for deletions, the object as it was deleted.
    pub object: Value,
    /// The object before a modification, so that filtered watches see objects enter and leave.
    pub previous: Option<Value>,
}

/// What a delete request did.
pub enum Deletion {
    /// The object has finalizers: it is marked with a `deletionTimestamp` and stays for now.
    Pending(Value),
    /// The object is gone.
    Removed(Value),
}

/// (namespace, name); the namespace is empty for cluster-scoped objects.
type ObjectKey = (String, String);

pub struct Store {
    resource_version: u64,
    objects: HashMap<GroupResource, BTreeMap<ObjectKey, Value>>,
    /// The uids of the stored objects, for the garbage collector.
    uids: HashSet<String>,
    log: VecDeque<Arc<Event>>,
    /// Watches from resource versions below this one may have missed events.
    oldest_replayable: u64,
    events: broadcast::Sender<Arc<Event>>,
    /// Bumped to end every open watch.
    dropped: tokio::sync::watch::Sender<u64>,
}

impl Store {
    pub fn new() -> Self {
        Self {
            resource_version: 1,
            objects: HashMap::new(),
            uids: HashSet::new(),
            log: VecDeque::new(),
            oldest_replayable: 1,
            events: broadcast::channel(BROADCAST_CAPACITY).0,
            dropped: tokio::sync::watch::channel(0).0,
        }
    }

    /// The resource version of the latest change.
    pub fn resource_version(&self) -> u64 {
        self.resource_version
    }

    pub fn get(&self, resource: &GroupResource, namespace: &str, name: &str) -> Option<&Value> {
        self.objects.get(resource)?.get(&(namespace.to_string(), name.to_string()))
    }

    /// The objects of a resource, in one namespace or in all, ordered by namespace and name.
    pub fn list<'a>(&'a self, resource: &GroupResource, namespace: Option<&'a str>) -> impl Iterator<Item = &'a Value> {
        self.objects
            .get(resource)
            .into_iter()
            .flat_map(|objects| objects.iter())
            .filter(move |((ns, _), _)| namespace.is_none_or(|wanted| wanted == ns))
            .map(|(_, obj)| obj)
    }

    /// Assigns the next resource version to `object` and records the change.
    fn record(&mut self, resource: &GroupResource, kind: EventType, object: &mut Value, previous: Option<Value>) {
        self.resource_version += 1;
        meta::meta_mut(object).insert("resourceVersion".into(), json!(self.resource_version.to_string()));
        let event = Arc::new(Event {
            resource_version: self.resource_version,
            resource: resource.clone(),
            kind,
            object: object.clone(),
            previous,
        });
        self.log.push_back(event.clone());
        if self.log.len() > EVENT_LOG_CAPACITY {
            self.compact_through(self.log.len() - EVENT_LOG_CAPACITY);
        }
        let _ = self.events.send(event);
    }

    /// Drops the oldest `count` events of the log.
    fn compact_through(&mut self, count: usize) {
        for event in self.log.drain(..count) {
            self.oldest_replayable = event.resource_version;
        }
    }

    /// Forgets the whole event log, as etcd compaction does: watches from any resource version
    /// before now get 410 Gone.
    pub fn compact(&mut self) {
        self.compact_through(self.log.len());
        self.oldest_replayable = self.resource_version;
    }

    /// Stores a new object, returning it with its resource version.
    pub fn insert(&mut self, resource: &GroupResource, mut object: Value) -> Value {
        self.record(resource, EventType::Added, &mut object, None);
        self.uids.insert(meta::uid(&object).to_string());
        let key = (meta::namespace(&object).to_string(), meta::name(&object).to_string());
        self.objects.entry(resource.clone()).or_default().insert(key, object.clone());
        object
    }

    /// Replaces a stored object, returning it with its new resource version.
    pub fn replace(&mut self, resource: &GroupResource, mut object: Value) -> Value {
        let key = (meta::namespace(&object).to_string(), meta::name(&object).to_string());
        let previous = self.objects.get(resource).and_then(|m| m.get(&key)).cloned();
        self.record(resource, EventType::Modified, &mut object, previous);
        self.objects.entry(resource.clone()).or_default().insert(key, object.clone());
        object
    }

    /// Deletes an object the way the API server does: objects with finalizers are only marked
    /// with a `deletionTimestamp`; the others are removed.
    pub fn delete(&mut self, resource: &GroupResource, namespace: &str, name: &str) -> Option<Deletion> {
        let object = self.get(resource, namespace, name)?.clone();
        if meta::finalizers(&object).is_empty() {
            return Some(Deletion::Removed(self.finalize(resource, object)));
        }
        if meta::is_deleting(&object) {
            return Some(Deletion::Pending(object));
        }
        let mut marked = object;
        let metadata = meta::meta_mut(&mut marked);
        metadata.insert("deletionTimestamp".into(), json!(meta::now()));
        metadata.insert("deletionGracePeriodSeconds".into(), json!(0));
        Some(Deletion::Pending(self.replace(resource, marked)))
    }

    /// Removes an object whose finalizers are done, given in its final state, then the contents
    /// of a deleted namespace and whatever the garbage collector finds orphaned.
    pub fn finalize(&mut self, resource: &GroupResource, object: Value) -> Value {
        let removed = self.remove(resource, object);
        if *resource == GroupResource::new("", "namespaces") {
            self.delete_namespace_contents(meta::name(&removed));
        }
        self.collect_garbage();
        removed
    }

    /// Removes an object now, recording the deletion.
    fn remove(&mut self, resource: &GroupResource, mut object: Value) -> Value {
        let key = (meta::namespace(&object).to_string(), meta::name(&object).to_string());
        if let Some(objects) = self.objects.get_mut(resource) {
            objects.remove(&key);
        }
        self.uids.remove(meta::uid(&object));
        self.record(resource, EventType::Deleted, &mut object, None);
        object
    }

    /// Removes every object of a resource, as when its CRD is deleted.
    pub fn purge(&mut self, resource: &GroupResource) {
        let objects = self.objects.remove(resource).unwrap_or_default();
        for (_, object) in objects {
            self.remove(resource, object);
        }
        self.collect_garbage();
    }

    fn delete_namespace_contents(&mut self, namespace: &str) {
        let mut doomed = Vec::new();
        for (resource, objects) in &self.objects {
            for (ns, name) in objects.keys().filter(|(ns, _)| ns == namespace) {
                doomed.push((resource.clone(), ns.clone(), name.clone()));
            }
        }
        for (resource, ns, name) in doomed {
            self.delete(&resource, &ns, &name);
        }
    }

    /// Deletes the objects all of whose owners are gone (by uid), until none is left.
    fn collect_garbage(&mut self) {
        loop {
            let mut orphans = Vec::new();
            for (resource, objects) in &self.objects {
                for ((ns, name), obj) in objects {
                    let owners = meta::owner_uids(obj);
                    if !owners.is_empty()
                        && !meta::is_deleting(obj)
                        && owners.iter().all(|uid| !self.uids.contains(*uid))
                    {
                        orphans.push((resource.clone(), ns.clone(), name.clone()));
                    }
                }
            }
            if orphans.is_empty() {
                return;
            }
            for (resource, ns, name) in orphans {
                self.delete(&resource, &ns, &name);
            }
        }
    }

    /// Drops the owner references to `owner_uid` from every object (orphan propagation).
    pub fn orphan_dependents(&mut self, owner_uid: &str) {
        let mut dependents = Vec::new();
        for (resource, objects) in &self.objects {
            for obj in objects.values().filter(|o| meta::owner_uids(o).contains(&owner_uid)) {
                dependents.push((resource.clone(), obj.clone()));
            }
        }
        for (resource, mut obj) in dependents {
            if let Some(Value::Array(refs)) = meta::meta_mut(&mut obj).get_mut("ownerReferences") {
                refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(owner_uid));
            }
            self.replace(&resource, obj);
        }
    }

    /// New events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    /// Ends every open watch (they see their response end, as when an API server restarts).
    pub fn drop_watches(&mut self) {
        self.dropped.send_modify(|n| *n += 1);
    }

    /// Changes when [`Store::drop_watches`] is called.
    pub fn watch_drops(&self) -> tokio::sync::watch::Receiver<u64> {
        self.dropped.subscribe()
    }

    /// The events after `resource_version`, or `Err(oldest)` when the log no longer reaches back
    /// that far.
    pub fn events_after(&self, resource_version: u64) -> Result<Vec<Arc<Event>>, u64> {
        if resource_version < self.oldest_replayable {
            return Err(self.oldest_replayable);
        }
        Ok(self.log.iter().filter(|e| e.resource_version > resource_version).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(name: &str, uid: &str, owners: &[&str], finalizers: &[&str]) -> Value {
        let refs: Vec<Value> =
            owners.iter().map(|o| json!({"uid": o, "name": "x", "kind": "X", "apiVersion": "v1"})).collect();
        json!({"metadata": {"name": name, "namespace": "ns", "uid": uid, "ownerReferences": refs, "finalizers": finalizers}})
    }

    #[test]
    fn garbage_collects_dependents_whose_owners_are_all_gone() {
        let cm = GroupResource::new("", "configmaps");
        let mut store = Store::new();
        store.insert(&cm, obj("owner-a", "a", &[], &[]));
        store.insert(&cm, obj("owner-b", "b", &[], &[]));
        store.insert(&cm, obj("only-a", "1", &["a"], &[]));
        store.insert(&cm, obj("both", "2", &["a", "b"], &[]));
        store.insert(&cm, obj("grandchild", "3", &["1"], &[]));
        store.insert(&cm, obj("held", "4", &["a"], &["keep"]));
        assert!(matches!(store.delete(&cm, "ns", "owner-a"), Some(Deletion::Removed(_))));
        let names: Vec<&str> = store.list(&cm, None).map(meta::name).collect();
        assert_eq!(names, vec!["both", "held", "owner-b"]);
        assert!(meta::is_deleting(store.get(&cm, "ns", "held").unwrap()));
    }

    #[test]
    fn replays_events_until_compacted() {
        let cm = GroupResource::new("", "configmaps");
        let mut store = Store::new();
        let first = store.insert(&cm, obj("a", "1", &[], &[]));
        store.insert(&cm, obj("b", "2", &[], &[]));
        let rv: u64 = meta::resource_version(&first).parse().unwrap();
        assert_eq!(store.events_after(rv).unwrap().len(), 1);
        store.compact();
        assert!(store.events_after(rv).is_err());
        assert!(store.events_after(store.resource_version()).unwrap().is_empty());
    }
}
