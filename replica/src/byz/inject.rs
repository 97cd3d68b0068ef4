//! Faults a test can inject into a replica (`--inject BEHAVIOUR`, `LOCKSTEP_INJECT`). Present
//! only in builds with the cargo feature `fault-injection`, which is off by default: a release
//! build has no way to turn a replica faulty.

/// One Byzantine behaviour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Sign and send wrong outputs.
    WrongOutput,
    /// Answer nobody, relay nothing.
    Silent,
    /// Relay altered copies of items to some peers and nothing to others.
    EquivocateRelays,
    /// Relay items with forged client signatures and made-up clients.
    ForgeRequests,
    /// Relay every item again, later and repeatedly.
    ReplayRequests,
    /// Execute stable items newest-first.
    Reorder,
    /// Serve a snapshot whose data does not match its digest.
    CorruptSnapshot,
    /// Claim another machine version in replies and status.
    WrongVersion,
}

pub const ALL: &[(&str, Behaviour)] = &[
    ("wrong-output", Behaviour::WrongOutput),
    ("silent", Behaviour::Silent),
    ("equivocate-relays", Behaviour::EquivocateRelays),
    ("forge-requests", Behaviour::ForgeRequests),
    ("replay-requests", Behaviour::ReplayRequests),
    ("reorder", Behaviour::Reorder),
    ("corrupt-snapshot", Behaviour::CorruptSnapshot),
    ("wrong-version", Behaviour::WrongVersion),
];

impl Behaviour {
    pub fn parse(s: &str) -> Result<Behaviour, String> {
        ALL.iter().find(|(n, _)| *n == s).map(|(_, b)| *b).ok_or_else(|| {
            format!(
                "unknown behaviour '{s}'; one of: {}",
                ALL.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            )
        })
    }
    pub fn name(self) -> &'static str {
        ALL.iter().find(|(_, b)| *b == self).map_or("?", |(n, _)| n)
    }
}

/// Whether this build can inject faults at all.
pub const AVAILABLE: bool = cfg!(feature = "fault-injection");
