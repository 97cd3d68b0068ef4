//! The admission rules of the resource, one place for both enforcers.
//!
//! Each rule is a CEL expression (put into the CRD as `x-kubernetes-validations`, evaluated by
//! the API server) and the message a person sees when it fails. [`crate::validate`] checks the
//! same conditions in Rust and reports the same message, so `lockstep up FILE` rejects exactly
//! what `kubectl apply -f FILE` would. A test evaluates the CEL rules client-side (kube-cel) on
//! the same fixtures to keep the two in step.
//!
//! Rules use only the CEL library of Kubernetes 1.28, the oldest release we support (no
//! `quantity`, `ip`, `cidr`, `format`, `semver` or optional types); a test fails on any other
//! function (`operator/tests/crd_committed.rs`).
//!
//! Regular expressions are written without backslashes (`[.]`, `[+]`) so the rule reads the same
//! in Rust, JSON and YAML.

/// Largest t accepted: 2t+1 = 15 Byzantine replicas.
pub const MAX_FAULTS_TOLERATED: i32 = 7;
/// Longest `metadata.name`: pods are `NAME-N` and services `NAME-peers`, all DNS-1035 labels.
pub const MAX_NAME_LEN: usize = 50;

pub const NAME_RULE: &str =
    "size(self.metadata.name) <= 50 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')";
pub const NAME_MSG: &str = "metadata.name must be at most 50 characters of lowercase letters, digits and '-', starting with a letter and ending with a letter or digit (it names the replica pods and services)";

pub const FAULTS_RULE: &str = "self >= 0 && self <= 7";
pub const FAULTS_MSG: &str = "faultsTolerated (t) must be between 0 and 7: FailStop runs t+1 replicas, Byzantine 2t+1";

pub const FAILURE_MODEL_IMMUTABLE_RULE: &str = "self == oldSelf";
pub const FAILURE_MODEL_IMMUTABLE_MSG: &str = "failureModel is immutable: a cluster cannot switch between FailStop and Byzantine in place; create a new ReplicatedStateMachine and move the data";

pub const MACHINE_NAME_RULE: &str = "size(self) <= 63 && self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')";
pub const MACHINE_NAME_MSG: &str = "machine.name must be at most 63 characters of lowercase letters, digits and '-', starting and ending with a letter or digit (e.g. kv)";

pub const VERSION_RULE: &str = "size(self) <= 64 && self.matches('^[0-9]+[.][0-9]+[.][0-9]+(-[0-9A-Za-z-]+([.][0-9A-Za-z-]+)*)?([+][0-9A-Za-z-]+([.][0-9A-Za-z-]+)*)?$')";
pub const VERSION_MSG: &str = "machine.version must be a semantic version MAJOR.MINOR.PATCH with an optional -prerelease and +build suffix, at most 64 characters (e.g. 1.0.0 or 2.1.0-rc.1)";

pub const IMAGE_RULE: &str = "size(self) > 0 && size(self) <= 512 && !self.contains(' ')";
pub const IMAGE_MSG: &str = "machine.image must be a container image reference without spaces, 1 to 512 characters (e.g. ghcr.io/lockstep-dev/lockstep-replica:0.1.0)";

pub const DIGEST_RULE: &str = "self.matches('^sha256:[a-f0-9]{64}$')";
pub const DIGEST_MSG: &str = "machine.digest must be 'sha256:' followed by 64 lowercase hexadecimal digits";

pub const ORDERING_BYZANTINE_RULE: &str = "!has(self.ordering) || self.failureModel == 'Byzantine'";
pub const ORDERING_BYZANTINE_MSG: &str = "ordering applies only to failureModel: Byzantine (FailStop replicas take their order from the primary); remove spec.ordering";

pub const CLIENT_IDENTITIES_BYZANTINE_RULE: &str = "!has(self.clientIdentities) || self.failureModel == 'Byzantine'";
pub const CLIENT_IDENTITIES_BYZANTINE_MSG: &str = "clientIdentities applies only to failureModel: Byzantine (FailStop clients do not sign requests); remove spec.clientIdentities";

pub const CLOCK_BOUNDS_RULE: &str =
    "!has(self.maxClockSkewMillis) || (has(self.stability) && self.stability == 'PhysicalClock')";
pub const CLOCK_BOUNDS_MSG: &str = "ordering.maxClockSkewMillis applies only to stability: PhysicalClock (both stabilities use maxDelayMillis, the delay bound of the relay agreement)";

pub const MAX_SKEW_RULE: &str = "self >= 0 && self <= 60000";
pub const MAX_SKEW_MSG: &str = "ordering.maxClockSkewMillis must be between 0 and 60000 (one minute)";

pub const MAX_DELAY_RULE: &str = "self >= 1 && self <= 600000";
pub const MAX_DELAY_MSG: &str = "ordering.maxDelayMillis must be between 1 and 600000 (ten minutes)";

pub const EPHEMERAL_RULE: &str =
    "!has(self.ephemeral) || !self.ephemeral || (!has(self.size) && !has(self.storageClassName))";
pub const EPHEMERAL_MSG: &str = "storage.ephemeral: true keeps replica data in an emptyDir; it cannot be combined with storage.size or storage.storageClassName";

/// A positive quantity (`<number><suffix>`, at least one non-zero digit, no minus sign), by
/// regular expression: the CEL `quantity` library arrived only in Kubernetes 1.29, and the
/// CRD must install on 1.28 (the minimum we support).
pub const SIZE_RULE: &str = "size(self) <= 64 && self.matches('^[+]?([0-9]*[1-9][0-9]*([.][0-9]*)?|[0-9]*[.][0-9]*[1-9][0-9]*)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$')";
pub const SIZE_MSG: &str = "storage.size must be a positive quantity such as 1Gi or 500Mi";

pub const SUBDOMAIN_RULE: &str =
    "size(self) <= 253 && self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')";
pub const STORAGE_CLASS_MSG: &str = "storage.storageClassName must be a DNS subdomain name (lowercase letters, digits, '-' and '.', at most 253 characters)";
pub const SECRET_NAME_MSG: &str = "clientIdentities.secretRef.name must be a DNS subdomain name (lowercase letters, digits, '-' and '.', at most 253 characters)";
pub const ISSUER_NAME_MSG: &str = "tls.issuerRef.name must be a DNS subdomain name (lowercase letters, digits, '-' and '.', at most 253 characters): the name of a cert-manager Issuer or ClusterIssuer";
pub const ISSUER_GROUP_MSG: &str = "tls.issuerRef.group must be a DNS subdomain name such as cert-manager.io (the default) or an external issuer's API group";

/// cert-manager's own group has two kinds; an external issuer (another group) names its own.
pub const ISSUER_KIND_RULE: &str = "!has(self.kind) || ((has(self.group) && self.group != 'cert-manager.io') ? self.kind.matches('^[A-Z][A-Za-z0-9]*$') : (self.kind == 'Issuer' || self.kind == 'ClusterIssuer'))";
pub const ISSUER_KIND_MSG: &str = "tls.issuerRef.kind must be Issuer (the default) or ClusterIssuer for cert-manager.io issuers; with an external issuer's group, that issuer's kind (a capitalised name such as AWSPCAClusterIssuer)";

/// Switching issuers in place would leave replicas with certificates of different CAs that
/// refuse each other: a transition rule (an update only).
pub const ISSUER_IMMUTABLE_RULE: &str = "(has(self.tls) && has(self.tls.issuerRef)) == (has(oldSelf.tls) && has(oldSelf.tls.issuerRef)) && (!has(self.tls) || !has(self.tls.issuerRef) || self.tls.issuerRef == oldSelf.tls.issuerRef)";
pub const ISSUER_IMMUTABLE_MSG: &str = "spec.tls.issuerRef cannot be added, removed or changed on an existing ReplicatedStateMachine: replicas holding certificates of different CAs would refuse each other. Create a new one (spec.storage.retainOnDelete keeps the data across the switch)";
