//! Durable log and snapshots (being written).
