//! Test certificates: a CA of its own per call, and leaf certificates for an identity
//! (valid for 127.0.0.1, client and server use), as `lockstep up` issues them.

use super::PeerIdentity;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};

pub struct Ca {
    pub issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

pub fn ca() -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    // Each its own name (as each cluster's CA has): issuers are found by name.
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("test CA {}", rand::random::<u64>()));
    let pem = params.self_signed(&key).unwrap().pem();
    Ca {
        issuer: Issuer::new(params, key),
        pem,
    }
}

/// (certificate, key) PEM for `who`, valid for 127.0.0.1.
pub fn issue(ca: &Ca, who: &PeerIdentity) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params
        .subject_alt_names
        .push(SanType::URI(who.uri().try_into().unwrap()));
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
    (params.signed_by(&key, &ca.issuer).unwrap().pem(), key.serialize_pem())
}
