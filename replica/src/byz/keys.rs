//! Ed25519 keys of Byzantine mode: where they live and how they are written.
//!
//! * A replica's key pair: `<data-dir>/replica.key` (created on first start), or the file
//!   named by `--key-file` / `LOCKSTEP_REPLICA_KEY_FILE` (a Kubernetes Secret). The public key
//!   is written next to it as `replica.pub` and reported in `Status`.
//! * Client public keys: a directory with one file per client, named by the client id
//!   (`--client-identities` / `LOCKSTEP_CLIENT_IDENTITIES`, e.g. a mounted Secret).
//! * The configuration master's public key: `--master-public-key` /
//!   `LOCKSTEP_MASTER_PUBLIC_KEY` (hex, or a path to a file holding it).
//!
//! Key files hold 64 hexadecimal characters (32 bytes: the secret seed or the public key),
//! optionally prefixed by `ed25519:` and surrounded by white space; a file of exactly 32 raw
//! bytes is accepted too.

use anyhow::{Context, bail};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::Digest;
use std::collections::BTreeMap;
use std::path::Path;

pub const REPLICA_KEY_FILE: &str = "replica.key";
pub const REPLICA_PUB_FILE: &str = "replica.pub";
/// The identity the configuration master signs its stream with.
pub const MASTER_IDENTITY: &str = "master";

/// 32 bytes from hex text (with an optional `ed25519:` prefix) or raw bytes.
pub fn parse_key_bytes(data: &[u8]) -> anyhow::Result<[u8; 32]> {
    if data.len() == 32 && std::str::from_utf8(data).map_or(true, |s| s.trim().len() != 32) {
        let mut out = [0u8; 32];
        out.copy_from_slice(data);
        return Ok(out);
    }
    let text = std::str::from_utf8(data).context("key is neither 32 raw bytes nor text")?;
    let text = text.trim();
    let text = text.strip_prefix("ed25519:").unwrap_or(text);
    let bytes = hex::decode(text).context("key is not hexadecimal")?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| anyhow::anyhow!("key has {} bytes, expected 32", bytes.len()))
}

pub fn public_key_from_bytes(bytes: &[u8]) -> anyhow::Result<VerifyingKey> {
    let b = <[u8; 32]>::try_from(bytes).map_err(|_| anyhow::anyhow!("public key has {} bytes", bytes.len()))?;
    VerifyingKey::from_bytes(&b).map_err(|e| anyhow::anyhow!("not an Ed25519 public key: {e}"))
}

pub fn parse_public_key(data: &[u8]) -> anyhow::Result<VerifyingKey> {
    public_key_from_bytes(&parse_key_bytes(data)?)
}

/// A public key given inline (hex) or as a path to a file holding it.
pub fn public_key_arg(arg: &str) -> anyhow::Result<VerifyingKey> {
    if let Ok(k) = parse_public_key(arg.as_bytes()) {
        return Ok(k);
    }
    let data =
        std::fs::read(arg).with_context(|| format!("'{arg}' is neither a hex public key nor a readable file"))?;
    parse_public_key(&data).with_context(|| format!("public key file {arg}"))
}

pub fn encode_key(bytes: &[u8; 32]) -> String {
    format!("{}\n", hex::encode(bytes))
}

pub fn random_signing_key() -> SigningKey {
    use rand::RngCore;
    let mut seed = [0u8; 32];
    rand::rng().fill_bytes(&mut seed);
    SigningKey::from_bytes(&seed)
}

/// Read the signing key at `path`, or create one there (mode 0600) when the file is missing.
pub fn load_or_create_signing_key(path: &Path) -> anyhow::Result<SigningKey> {
    match std::fs::read(path) {
        Ok(data) => Ok(SigningKey::from_bytes(
            &parse_key_bytes(&data).with_context(|| format!("key file {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = random_signing_key();
            write_private(path, encode_key(&key.to_bytes()).as_bytes())?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read key file {}", path.display())),
    }
}

pub fn load_signing_key(path: &Path) -> anyhow::Result<SigningKey> {
    let data = std::fs::read(path).with_context(|| format!("cannot read key file {}", path.display()))?;
    Ok(SigningKey::from_bytes(
        &parse_key_bytes(&data).with_context(|| format!("key file {}", path.display()))?,
    ))
}

/// Write a secret file readable only by its owner (atomically).
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Client public keys: one file per client in `dir`, named by the client id. Hidden entries
/// (a Kubernetes Secret mount's `..data` links) and sub-directories are skipped; an unreadable
/// key is an error naming the file.
pub fn load_identity_dir(dir: &Path) -> anyhow::Result<BTreeMap<String, VerifyingKey>> {
    let mut out = BTreeMap::new();
    let rd = std::fs::read_dir(dir).with_context(|| format!("cannot read client identities {}", dir.display()))?;
    for entry in rd {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !entry.path().is_file() {
            continue;
        }
        if name == MASTER_IDENTITY {
            bail!(
                "{}: a client may not be called '{MASTER_IDENTITY}'",
                entry.path().display()
            );
        }
        let data = std::fs::read(entry.path())?;
        let key = parse_public_key(&data).with_context(|| format!("client identity {}", entry.path().display()))?;
        out.insert(name, key);
    }
    Ok(out)
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(data).into()
}

pub fn sign(key: &SigningKey, msg: &[u8]) -> Vec<u8> {
    key.sign(msg).to_bytes().to_vec()
}

/// Strict verification (no malleable signatures, no small-order keys or `R`).
///
/// `verify_strict` alone: in ed25519-dalek 2 it checks the same equation as `verify` (the
/// recomputed `R` against the signature's encoded `R`) and rejects more, so calling both (as
/// this did) doubled the cost of every verification for nothing.
pub fn verify(key: &VerifyingKey, msg: &[u8], signature: &[u8]) -> bool {
    let Ok(sig) = Signature::from_slice(signature) else {
        return false;
    };
    key.verify_strict(msg, &sig).is_ok()
}

/// What a replica signs when it relays an item: the era and the item's digest.
pub fn relay_message(era: u64, item_digest: &[u8; 32]) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    h.update(b"lockstep-relay");
    h.update(era.to_le_bytes());
    h.update(item_digest);
    h.finalize().into()
}

/// What a replica signs once for a whole batch of relayed items: the era and the root of a
/// Merkle tree over the items' digests. Each item then carries its path to the root.
pub fn relay_batch_message(era: u64, root: &[u8; 32]) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    h.update(b"lockstep-relay-batch");
    h.update(era.to_le_bytes());
    h.update(root);
    h.finalize().into()
}

/// What a replica signs once for a group of replies: the root of a Merkle tree over the
/// encoded reply bodies' digests.
pub fn reply_batch_message(root: &[u8; 32]) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    h.update(b"lockstep-reply-batch");
    h.update(root);
    h.finalize().into()
}

/// Whether `signature` (with `path` and `position` when it was made for a group of replies)
/// is `key`'s signature on the encoded reply `body`.
pub fn verify_reply(key: &VerifyingKey, body: &[u8], signature: &[u8], path: &[Vec<u8>], position: u64) -> bool {
    if path.is_empty() {
        return verify(key, body, signature);
    }
    merkle_root(&sha256(body), position, path).is_some_and(|root| verify(key, &reply_batch_message(&root), signature))
}

/// Leaves and inner nodes are hashed with different prefixes, so no inner node can be passed
/// off as a leaf (or the other way round).
fn merkle_leaf(digest: &[u8; 32]) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    h.update([0u8]);
    h.update(digest);
    h.finalize().into()
}

fn merkle_node(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// A Merkle tree over `digests` (at least one): its root, and for each leaf its path (the
/// sibling at every level, bottom up). A level with an odd number of nodes pairs the last
/// one with itself.
pub fn merkle_tree(digests: &[[u8; 32]]) -> ([u8; 32], Vec<Vec<Vec<u8>>>) {
    let mut level: Vec<[u8; 32]> = digests.iter().map(merkle_leaf).collect();
    let mut paths: Vec<Vec<Vec<u8>>> = vec![Vec::new(); digests.len()];
    let mut positions: Vec<usize> = (0..digests.len()).collect();
    while level.len() > 1 {
        for (leaf, pos) in positions.iter_mut().enumerate() {
            let sibling = level.get(*pos ^ 1).unwrap_or(&level[*pos]);
            paths[leaf].push(sibling.to_vec());
            *pos /= 2;
        }
        level = level
            .chunks(2)
            .map(|pair| merkle_node(&pair[0], pair.get(1).unwrap_or(&pair[0])))
            .collect();
    }
    (level.first().copied().unwrap_or([0u8; 32]), paths)
}

/// The root a leaf at `position` with `path` leads to (None if a path entry is malformed).
pub fn merkle_root(digest: &[u8; 32], position: u64, path: &[Vec<u8>]) -> Option<[u8; 32]> {
    if path.len() > 63 {
        return None;
    }
    let mut node = merkle_leaf(digest);
    let mut pos = position;
    for sibling in path {
        let sibling = <[u8; 32]>::try_from(sibling.as_slice()).ok()?;
        node = if pos & 1 == 0 {
            merkle_node(&node, &sibling)
        } else {
            merkle_node(&sibling, &node)
        };
        pos >>= 1;
    }
    (pos == 0).then_some(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_leaf_of_a_merkle_tree_leads_to_its_root_and_nothing_else_does() {
        for n in 1..=9usize {
            let digests: Vec<[u8; 32]> = (0..n).map(|i| sha256(&[i as u8])).collect();
            let (root, paths) = merkle_tree(&digests);
            for (i, d) in digests.iter().enumerate() {
                assert_eq!(merkle_root(d, i as u64, &paths[i]), Some(root), "n {n} leaf {i}");
                let other = sha256(b"not in the tree");
                assert_ne!(merkle_root(&other, i as u64, &paths[i]), Some(root));
                if i ^ 1 < n {
                    assert_ne!(merkle_root(d, (i as u64) ^ 1, &paths[i]), Some(root), "n {n} leaf {i}");
                }
            }
        }
        let d = sha256(b"x");
        let (_, paths) = merkle_tree(&[d, d]);
        assert_eq!(
            merkle_root(&d, 4, &paths[0]),
            None,
            "a position beyond the path is refused"
        );
    }

    #[test]
    fn keys_round_trip_through_files_and_hex() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let a = load_or_create_signing_key(&path).unwrap();
        let b = load_or_create_signing_key(&path).unwrap();
        assert_eq!(a.to_bytes(), b.to_bytes(), "the second load reads the same key");
        let public = encode_key(&a.verifying_key().to_bytes());
        let ids = dir.path().join("ids");
        std::fs::create_dir(&ids).unwrap();
        std::fs::write(ids.join("alice"), format!("ed25519:{public}")).unwrap();
        std::fs::write(ids.join("bob"), a.verifying_key().to_bytes()).unwrap();
        std::fs::write(ids.join("..data"), "ignored").unwrap();
        let loaded = load_identity_dir(&ids).unwrap();
        assert_eq!(loaded.len(), 2);
        assert_eq!(loaded["alice"], a.verifying_key());
        assert_eq!(loaded["bob"], a.verifying_key());
        let sig = sign(&a, b"m");
        assert!(verify(&loaded["alice"], b"m", &sig));
        assert!(!verify(&loaded["alice"], b"n", &sig));
        assert!(!verify(&loaded["alice"], b"m", &sig[..10]));
        std::fs::write(ids.join("carol"), "not a key").unwrap();
        let err = load_identity_dir(&ids).unwrap_err();
        assert!(format!("{err:#}").contains("carol"), "{err:#}");
    }
}
