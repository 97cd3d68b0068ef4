//! The on-disk history format: one JSON object per line (see the crate docs).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io::{BufRead, Write};

/// The kind of a key-value operation.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum OpKind {
    Get,
    Put,
    Delete,
    Cas,
}

/// What the client learned about an operation.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Answered; `output` is valid and `return` is set.
    Ok,
    /// Certainly did not take effect; the checker drops it.
    Fail,
    /// May or may not have taken effect, at any time after `call`.
    Unknown,
}

/// One operation of a history, exactly as written to / read from a history file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct HistoryEntry {
    pub client: String,
    pub op: OpKind,
    pub key: String,
    /// The value written by a `put`.
    #[serde(default)]
    pub value: Option<String>,
    /// The expected value of a `cas`; `None` means "the key must be absent".
    #[serde(default)]
    pub old: Option<String>,
    /// The value a `cas` writes; `None` deletes the key.
    #[serde(default)]
    pub new: Option<String>,
    /// Monotonic nanoseconds when the client sent the request.
    pub call: u64,
    /// Monotonic nanoseconds when the answer arrived; `None` when none came.
    #[serde(rename = "return", default)]
    pub ret: Option<u64>,
    pub result: Outcome,
    /// The machine's answer, for `ok` entries (see [`Output`]).
    #[serde(default)]
    pub output: Option<Value>,
}

/// The decoded `output` of an `ok` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// `get` → `{"value": string|null}`
    Get { value: Option<String> },
    /// `put` / `delete` → `{"previous": string|null}`
    Previous { previous: Option<String> },
    /// `cas` → `{"swapped": bool, "current": string|null}`
    Cas { swapped: bool, current: Option<String> },
}

/// A history file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("line {line}: read error: {source}")]
    Io {
        line: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("line {line}: invalid JSON: {source}")]
    Json {
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("line {line}: invalid entry: {reason}")]
    Invalid { line: usize, reason: String },
}

fn opt_string_field(obj: &serde_json::Map<String, Value>, name: &str) -> Result<Option<String>, String> {
    match obj.get(name) {
        None => Err(format!("output has no \"{name}\" field")),
        Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("output \"{name}\" must be a string or null, got {other}")),
    }
}

impl HistoryEntry {
    /// Decodes `output` according to `op`. Only meaningful for `ok` entries.
    pub fn decode_output(&self) -> Result<Output, String> {
        let obj = match &self.output {
            Some(Value::Object(obj)) => obj,
            Some(other) => return Err(format!("output must be an object, got {other}")),
            None => return Err("an ok entry needs an output".to_string()),
        };
        match self.op {
            OpKind::Get => Ok(Output::Get {
                value: opt_string_field(obj, "value")?,
            }),
            OpKind::Put | OpKind::Delete => Ok(Output::Previous {
                previous: opt_string_field(obj, "previous")?,
            }),
            OpKind::Cas => {
                let swapped = match obj.get("swapped") {
                    Some(Value::Bool(b)) => *b,
                    Some(other) => return Err(format!("output \"swapped\" must be a bool, got {other}")),
                    None => return Err("output has no \"swapped\" field".to_string()),
                };
                Ok(Output::Cas {
                    swapped,
                    current: opt_string_field(obj, "current")?,
                })
            }
        }
    }

    /// Checks the entry is well-formed: an `ok` entry has a return time not before its
    /// call and an output of the right shape; a `put` has a value.
    pub fn validate(&self) -> Result<(), String> {
        if self.result == Outcome::Fail {
            return Ok(());
        }
        if self.op == OpKind::Put && self.value.is_none() {
            return Err("a put needs a string \"value\"".to_string());
        }
        if self.result == Outcome::Ok {
            match self.ret {
                None => return Err("an ok entry needs a \"return\" time".to_string()),
                Some(r) if r < self.call => {
                    return Err(format!("return ({r}) is before call ({})", self.call));
                }
                Some(_) => {}
            }
            self.decode_output()?;
        }
        Ok(())
    }
}

/// Reads a history: one JSON [`HistoryEntry`] per line; blank lines are skipped.
/// Entries are validated ([`HistoryEntry::validate`]); errors name the 1-based line.
pub fn parse_history(r: impl BufRead) -> Result<Vec<HistoryEntry>, HistoryError> {
    let mut out = Vec::new();
    for (i, line) in r.lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|source| HistoryError::Io { line: line_no, source })?;
        if line.trim().is_empty() {
            continue;
        }
        let entry: HistoryEntry =
            serde_json::from_str(&line).map_err(|source| HistoryError::Json { line: line_no, source })?;
        entry
            .validate()
            .map_err(|reason| HistoryError::Invalid { line: line_no, reason })?;
        out.push(entry);
    }
    Ok(out)
}

/// Writes one entry as a single JSON line (with the trailing newline).
pub fn write_entry(w: &mut impl Write, e: &HistoryEntry) -> std::io::Result<()> {
    serde_json::to_writer(&mut *w, e)?;
    w.write_all(b"\n")
}
