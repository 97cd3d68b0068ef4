//! Events: one for every decision the operator takes, on the RSM it concerns.

use kube::Resource;
use kube::runtime::events::{Event, EventType};
use lockstep_resource::ReplicatedStateMachine;

use crate::controller::{Context, key};

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
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &rsm.object_ref(&())).await {
        tracing::warn!(object = %key(rsm), error = %e, "could not publish event");
    }
}
