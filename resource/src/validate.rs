//! The CEL rules of [`crate::rules`], checked in Rust with the same messages.

use std::fmt;

use crate::rules::*;
use crate::types::{
    CERT_MANAGER_GROUP, FailureModel, IssuerRef, MachineSpec, OrderingSpec, ReplicatedStateMachine, Stability,
    StorageSpec,
};

/// One violated rule: the field it is attached to and the rule's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the field, e.g. `spec.machine.version`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// All violations of one object, in field order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

struct Collector(Vec<FieldError>);

impl Collector {
    fn check(&mut self, ok: bool, field: &str, message: &str) {
        if !ok {
            self.0.push(FieldError {
                field: field.to_string(),
                message: message.to_string(),
            });
        }
    }

    fn into_result(self) -> Result<(), ValidationErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(self.0))
        }
    }
}

impl ReplicatedStateMachine {
    /// Checks the object against the admission rules (creation). Mirrors the CRD's CEL rules
    /// message for message.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut c = Collector(Vec::new());
        let name = self.metadata.name.as_deref().unwrap_or_default();
        c.check(is_dns1035_label(name, MAX_NAME_LEN), "metadata.name", NAME_MSG);

        let s = &self.spec;
        c.check(
            (0..=MAX_FAULTS_TOLERATED).contains(&s.faults_tolerated),
            "spec.faultsTolerated",
            FAULTS_MSG,
        );
        c.check_machine(&s.machine);
        if let Some(o) = &s.ordering {
            c.check_ordering(o);
        }
        if let Some(st) = &s.storage {
            c.check_storage(st);
        }
        if let Some(ids) = &s.client_identities {
            c.check(
                is_dns_subdomain(&ids.secret_ref.name),
                "spec.clientIdentities.secretRef.name",
                SECRET_NAME_MSG,
            );
        }
        if let Some(issuer) = self.issuer_ref() {
            c.check_issuer(issuer);
        }
        c.check(
            s.ordering.is_none() || s.failure_model == FailureModel::Byzantine,
            "spec",
            ORDERING_BYZANTINE_MSG,
        );
        c.check(
            s.client_identities.is_none() || s.failure_model == FailureModel::Byzantine,
            "spec",
            CLIENT_IDENTITIES_BYZANTINE_MSG,
        );
        c.into_result()
    }

    /// Checks an update from `old` to `self`: the creation rules plus the transition rules
    /// (the immutable failure model and certificate issuer).
    pub fn validate_update(&self, old: &ReplicatedStateMachine) -> Result<(), ValidationErrors> {
        let mut c = Collector(match self.validate() {
            Ok(()) => Vec::new(),
            Err(ValidationErrors(e)) => e,
        });
        c.check(
            self.spec.failure_model == old.spec.failure_model,
            "spec.failureModel",
            FAILURE_MODEL_IMMUTABLE_MSG,
        );
        c.check(self.issuer_ref() == old.issuer_ref(), "spec", ISSUER_IMMUTABLE_MSG);
        c.into_result()
    }
}

impl Collector {
    fn check_machine(&mut self, m: &MachineSpec) {
        self.check(is_dns_label(&m.name, 63), "spec.machine.name", MACHINE_NAME_MSG);
        self.check(
            m.version.len() <= 64 && is_semver(&m.version),
            "spec.machine.version",
            VERSION_MSG,
        );
        if let Some(image) = &m.image {
            self.check(
                !image.is_empty() && image.chars().count() <= 512 && !image.contains(' '),
                "spec.machine.image",
                IMAGE_MSG,
            );
        }
        if let Some(digest) = &m.digest {
            self.check(is_sha256_digest(digest), "spec.machine.digest", DIGEST_MSG);
        }
    }

    fn check_ordering(&mut self, o: &OrderingSpec) {
        self.check(
            o.max_clock_skew_millis.is_none() || o.stability == Some(Stability::PhysicalClock),
            "spec.ordering",
            CLOCK_BOUNDS_MSG,
        );
        if let Some(v) = o.max_clock_skew_millis {
            self.check(
                (0..=60_000).contains(&v),
                "spec.ordering.maxClockSkewMillis",
                MAX_SKEW_MSG,
            );
        }
        if let Some(v) = o.max_delay_millis {
            self.check(
                (1..=600_000).contains(&v),
                "spec.ordering.maxDelayMillis",
                MAX_DELAY_MSG,
            );
        }
    }

    fn check_storage(&mut self, st: &StorageSpec) {
        self.check(
            st.ephemeral != Some(true) || (st.size.is_none() && st.storage_class_name.is_none()),
            "spec.storage",
            EPHEMERAL_MSG,
        );
        if let Some(size) = &st.size {
            self.check(
                size.len() <= 64 && is_positive_quantity(size),
                "spec.storage.size",
                SIZE_MSG,
            );
        }
        if let Some(class) = &st.storage_class_name {
            self.check(
                is_dns_subdomain(class),
                "spec.storage.storageClassName",
                STORAGE_CLASS_MSG,
            );
        }
    }

    fn check_issuer(&mut self, issuer: &IssuerRef) {
        self.check(
            is_dns_subdomain(&issuer.name),
            "spec.tls.issuerRef.name",
            ISSUER_NAME_MSG,
        );
        if let Some(group) = &issuer.group {
            self.check(is_dns_subdomain(group), "spec.tls.issuerRef.group", ISSUER_GROUP_MSG);
        }
        if let Some(kind) = &issuer.kind {
            self.check(
                is_issuer_kind(kind, issuer.group.as_deref()),
                "spec.tls.issuerRef",
                ISSUER_KIND_MSG,
            );
        }
    }
}

/// cert-manager's own kinds (`Issuer`, `ClusterIssuer`), or for an external issuer's group any
/// `UpperCamelCase` kind.
fn is_issuer_kind(kind: &str, group: Option<&str>) -> bool {
    let external = group.is_some_and(|g| g != CERT_MANAGER_GROUP);
    if external {
        kind.chars().next().is_some_and(|c| c.is_ascii_uppercase()) && kind.chars().all(|c| c.is_ascii_alphanumeric())
    } else {
        kind == "Issuer" || kind == "ClusterIssuer"
    }
}

fn is_lower_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// `^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`, at most `max` bytes.
fn is_dns_label(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars().all(|c| is_lower_alnum(c) || c == '-')
        && s.chars().next().is_some_and(is_lower_alnum)
        && s.chars().last().is_some_and(is_lower_alnum)
}

/// `^[a-z]([-a-z0-9]*[a-z0-9])?$`, at most `max` bytes.
fn is_dns1035_label(s: &str, max: usize) -> bool {
    is_dns_label(s, max) && s.chars().next().is_some_and(|c| c.is_ascii_lowercase())
}

/// Dot-separated DNS labels, at most 253 bytes.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(|l| is_dns_label(l, usize::MAX))
}

fn is_ident_list(s: &str) -> bool {
    s.split('.')
        .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
}

/// `^[0-9]+[.][0-9]+[.][0-9]+(-IDENT([.]IDENT)*)?([+]IDENT([.]IDENT)*)?$`, IDENT = `[0-9A-Za-z-]+`.
pub(crate) fn is_semver(s: &str) -> bool {
    let (rest, build) = match s.split_once('+') {
        Some((r, b)) => (r, Some(b)),
        None => (s, None),
    };
    if build.is_some_and(|b| !is_ident_list(b)) {
        return false;
    }
    // The core has no '-', so the first '-' starts the prerelease.
    let (core, pre) = match rest.split_once('-') {
        Some((c, p)) => (c, Some(p)),
        None => (rest, None),
    };
    if pre.is_some_and(|p| !is_ident_list(p)) {
        return false;
    }
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
}

fn is_sha256_digest(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)))
}

/// A Kubernetes quantity (`<signedNumber><suffix>`) greater than zero.
pub(crate) fn is_positive_quantity(s: &str) -> bool {
    let (negative, body) = match s.as_bytes().first() {
        Some(b'+') => (false, &s[1..]),
        Some(b'-') => (true, &s[1..]),
        _ => (false, s),
    };
    let num_end = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, suffix) = body.split_at(num_end);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if number.matches('.').count() > 1 || (int.is_empty() && frac.is_empty()) {
        return false;
    }
    let suffix_ok = match suffix {
        "" | "n" | "u" | "m" | "k" | "M" | "G" | "T" | "P" | "E" => true,
        "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => true,
        exp if exp.starts_with('e') || exp.starts_with('E') => {
            let e = &exp[1..];
            let e = e.strip_prefix(['+', '-']).unwrap_or(e);
            !e.is_empty() && e.chars().all(|c| c.is_ascii_digit())
        }
        _ => false,
    };
    let nonzero = int.chars().chain(frac.chars()).any(|c| c != '0');
    suffix_ok && nonzero && !negative
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semver_shapes() {
        for ok in [
            "1.0.0",
            "0.0.1",
            "10.20.30",
            "2.1.0-rc.1",
            "1.0.0+build.7",
            "1.0.0-a-b.c+d-e",
        ] {
            assert!(is_semver(ok), "{ok}");
        }
        for bad in [
            "1.0",
            "v1.0.0",
            "1.0.0-",
            "1.0.0+",
            "1..0",
            "1.0.0-a..b",
            "1.0.0 ",
            "a.b.c",
            "1.0.0-ä",
        ] {
            assert!(!is_semver(bad), "{bad}");
        }
    }

    #[test]
    fn quantity_shapes() {
        for ok in ["1Gi", "500Mi", "1", "0.5Gi", "1e3", "1E+3", "+2k", ".5G", "5."] {
            assert!(is_positive_quantity(ok), "{ok}");
        }
        for bad in ["0", "0Gi", "-1Gi", "1GB", "Gi", "", "1.2.3", "1e", "one"] {
            assert!(!is_positive_quantity(bad), "{bad}");
        }
    }
}
