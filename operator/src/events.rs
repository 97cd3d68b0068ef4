//! Events: one for every decision the operator takes, on the RSM it concerns.
//!
//! kube's `Recorder` aggregates by (type, reason, action, object) and keeps the *first* note:
//! after a fail-over `kubectl describe` showed `Reconfigured (x4) "epoch 1 recorded ..."` while
//! the cluster was at epoch 4. Here the note is part of the key: a repeat of the same
//! decision with the same words becomes a series on one event (count, last seen), and every
//! different note is its own event with its own message.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::events::{EventType, Reporter};
use kube::{Client, Resource};
use lockstep_resource::ReplicatedStateMachine;

use crate::controller::{Context, key};

/// How long a published event is remembered for aggregation (kube's own recorder uses 6 min).
const SERIES_TTL: Duration = Duration::from_secs(6 * 60);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SeriesKey {
    type_: &'static str,
    reason: String,
    action: String,
    object: String,
    note: String,
}

/// Publishes `events.k8s.io/v1` events, aggregating only exact repeats.
pub struct Recorder {
    client: Client,
    reporter: Reporter,
    /// Published events by key, with when each was last seen.
    published: Mutex<HashMap<SeriesKey, (K8sEvent, Timestamp)>>,
}

impl Recorder {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self {
            client,
            reporter,
            published: Mutex::default(),
        }
    }

    fn event(
        &self,
        type_: &'static str,
        reason: &str,
        action: &str,
        note: &str,
        regarding: &ObjectReference,
    ) -> K8sEvent {
        let now = Timestamp::now();
        let object = regarding
            .name
            .clone()
            .unwrap_or_else(|| self.reporter.controller.clone());
        K8sEvent {
            metadata: ObjectMeta {
                name: Some(format!("{object}.{:x}", now.as_nanosecond())),
                namespace: regarding.namespace.clone(),
                ..Default::default()
            },
            action: Some(action.into()),
            reason: Some(reason.into()),
            note: Some(note.into()),
            type_: Some(type_.into()),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| self.reporter.controller.clone()),
            ),
            ..Default::default()
        }
    }

    /// Creates the event, or (an exact repeat within the TTL) counts it in its series.
    pub async fn publish(
        &self,
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let type_ = match type_ {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        };
        let key = SeriesKey {
            type_,
            reason: reason.into(),
            action: action.into(),
            object: format!(
                "{}/{}/{}",
                regarding.namespace.as_deref().unwrap_or_default(),
                regarding.name.as_deref().unwrap_or_default(),
                regarding.uid.as_deref().unwrap_or_default()
            ),
            note: note.into(),
        };
        let now = Timestamp::now();
        let repeat = {
            let mut published = self.published.lock().unwrap_or_else(|e| e.into_inner());
            let ttl = i64::try_from(SERIES_TTL.as_secs()).unwrap_or(i64::MAX);
            published.retain(|_, (_, seen)| now.as_second().saturating_sub(seen.as_second()) < ttl);
            published.get(&key).map(|(e, _)| e.clone())
        };
        let ns = regarding.namespace.clone().unwrap_or_else(|| "default".into());
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &ns);
        let event = match repeat {
            Some(mut e) => {
                let count = e.series.as_ref().map_or(2, |s| s.count + 1);
                e.series = Some(EventSeries {
                    count,
                    last_observed_time: MicroTime(now),
                });
                let name = e.metadata.name.clone().unwrap_or_default();
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&e)).await?;
                e
            }
            None => {
                let e = self.event(type_, reason, action, note, regarding);
                api.create(&PostParams::default(), &e).await?;
                e
            }
        };
        self.published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, (event, now));
        Ok(())
    }
}

/// Publishes an event about `rsm`. A failure to publish is logged, never fatal: the decision
/// was taken and recorded in status either way.
pub async fn publish(
    ctx: &Context,
    rsm: &ReplicatedStateMachine,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let note: String = note.chars().take(1000).collect();
    if let Err(e) = ctx
        .recorder
        .publish(type_, reason, action, &note, &rsm.object_ref(&()))
        .await
    {
        tracing::warn!(object = %key(rsm), error = %e, "could not publish event");
    }
}
