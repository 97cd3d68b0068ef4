//! `lockstep-linearizability`: a linearizability checker for key-value histories.
//!
//! Used by lockstep's fault-injection tests and by `lockstep bench --history FILE`; the
//! `lockstep-check FILE` binary checks a history file.
//!
//! # History format
//!
//! One JSON object per line ([`HistoryEntry`]):
//!
//! ```text
//! {"client":"c3","op":"put","key":"k1","value":"v","old":null,"new":null,"call":123,"return":456,"result":"ok","output":{"previous":null}}
//! ```
//!
//! * `op`: `get` | `put` | `delete` | `cas`; `value` is what a put writes; `old`/`new`
//!   are a cas's expected and new values (`old: null` = "the key must be absent").
//! * `call`, `return`: monotonic nanoseconds; `return` is null when no answer came.
//! * `result`: `ok` (answered, `output` valid), `fail` (certainly did not take effect:
//!   dropped), `unknown` (may or may not have taken effect, at any time after `call`).
//! * `output` of an `ok` entry: get → `{"value": v}`, put/delete → `{"previous": v}`
//!   (the value before), cas → `{"swapped": bool, "current": v}` (swapped iff the value
//!   before was `old`; `current` is the value after). Every key starts absent.
//!
//! # Example
//!
//! ```
//! use lockstep_linearizability::{check_kv, parse_history, CheckLimits, CheckResult};
//! let text = r#"
//! {"client":"a","op":"put","key":"k","value":"1","call":0,"return":10,"result":"ok","output":{"previous":null}}
//! {"client":"b","op":"get","key":"k","call":20,"return":30,"result":"ok","output":{"value":null}}
//! "#;
//! let history = parse_history(text.as_bytes()).unwrap();
//! // the get started after the put was acknowledged, so it must see "1"
//! assert!(matches!(check_kv(&history, CheckLimits::default()), CheckResult::NotLinearizable { .. }));
//! ```

mod check;
mod history;

pub use check::{CheckLimits, CheckResult, check_kv};
pub use history::{HistoryEntry, HistoryError, OpKind, Outcome, Output, parse_history, write_entry};
