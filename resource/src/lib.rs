//! `lockstep.dev/v1alpha1` `ReplicatedStateMachine`: the one object a user writes.
//!
//! The same file runs under `lockstep up FILE` (local processes) and `kubectl apply -f FILE`
//! (the operator). [`from_yaml`] parses and validates it with the rules the API server
//! enforces through the CRD's CEL validations ([`rules`]), with the same messages.

pub mod rule_cases;
pub mod rules;
mod types;
mod validate;

pub use types::*;
pub use validate::{FieldError, ValidationErrors};

/// API group and version.
pub const API_VERSION: &str = "lockstep.dev/v1alpha1";
pub const KIND: &str = "ReplicatedStateMachine";

#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("not a ReplicatedStateMachine: {0}")]
    Parse(#[from] serde_yaml_ng::Error),
    #[error("expected apiVersion {API_VERSION} and kind {KIND}, found apiVersion {api_version:?} and kind {kind:?}")]
    WrongKind { api_version: String, kind: String },
    #[error("unknown field {0:?} (the API server's strict field validation rejects it too)")]
    UnknownField(String),
    #[error("invalid ReplicatedStateMachine: {0}")]
    Invalid(#[from] ValidationErrors),
}

/// Parses one `ReplicatedStateMachine` YAML (or JSON) document and validates it.
pub fn from_yaml(text: &str) -> Result<ReplicatedStateMachine, ResourceError> {
    let raw: serde_json::Value = serde_yaml_ng::from_str(text)?;
    let field = |k: &str| raw.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_string();
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    if api_version != API_VERSION || kind != KIND {
        return Err(ResourceError::WrongKind { api_version, kind });
    }
    let rsm: ReplicatedStateMachine = serde_yaml_ng::from_str(text)?;
    // Fields the types do not know would be pruned (or, with kubectl's default strict field
    // validation, rejected) by the API server: reject them here rather than ignore a typo.
    if let (Some(input), Ok(parsed)) = (raw.get("spec"), serde_json::to_value(&rsm.spec))
        && let Some(path) = first_unknown_field("spec", input, &parsed)
    {
        return Err(ResourceError::UnknownField(path));
    }
    rsm.validate()?;
    Ok(rsm)
}

/// The first key (as a dotted path) of `input` that did not survive the round trip to `parsed`.
fn first_unknown_field(path: &str, input: &serde_json::Value, parsed: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    match (input, parsed) {
        (Value::Object(i), Value::Object(p)) => i.iter().find_map(|(k, v)| {
            let sub = format!("{path}.{k}");
            match p.get(k) {
                None if !v.is_null() => Some(sub),
                None => None,
                Some(pv) => first_unknown_field(&sub, v, pv),
            }
        }),
        (Value::Array(i), Value::Array(p)) => i
            .iter()
            .zip(p)
            .enumerate()
            .find_map(|(n, (iv, pv))| first_unknown_field(&format!("{path}[{n}]"), iv, pv)),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
