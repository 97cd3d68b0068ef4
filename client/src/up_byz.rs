//! `lockstep up` as the configuration master of a Byzantine cluster.
//!
//! Besides what it does in fail-stop mode (spawn, observe, plan), the master here:
//! - holds the master key (`<cluster>/master.key`) whose public key every replica is started
//!   with, and signs each era (members with their public keys, start index + state digest,
//!   ordering bounds) before pushing it to the members;
//! - runs its own signed stream: a Lamport participant that ticks, admits the streams clients
//!   ask to open (pending opens appear in the replicas' status), removes streams that stopped
//!   moving (a crashed client stalls Lamport stability) with a master-signed tombstone, and
//!   orders barriers (an era change; a seal for a rollout);
//! - writes `<cluster>/byzantine.json` for clients (members, public keys, t, era).
//!
//! The Kubernetes operator runs the same master (`from_parts`, with no directory): it keeps the
//! key and the signed era in a Secret instead of files, passes the client identity directory
//! it reads from the `spec.clientIdentities` Secret, and after a fail-over continues the
//! master stream from what t + 1 replicas report (`resume_stream`).

use crate::byz::{ClusterInfo, IDENTITIES_DIR, INFO_FILE, ReplicaInfo};
use anyhow::{Context, bail};
use ed25519_dalek::SigningKey;
use lockstep_planner::Config;
use lockstep_proto::{
    Admit, Barrier, ByzMember, ByzStatus, Era, MachineIdentity, Noop, SignedEra, SignedItem, StatusResponse,
    StreamItem, Tombstone, byzantine_client::ByzantineClient, stream_item::Body,
};
use lockstep_replica::byz::{keys, order};
use prost::Message;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Ordering parameters from `spec.ordering` (with lockstep's defaults).
#[derive(Clone, Debug)]
pub struct Ordering {
    pub stability: String,
    pub max_delay_millis: u64,
    pub max_clock_skew_millis: u64,
}

pub const MASTER_KEY_FILE: &str = "master.key";
const MASTER_STATE_FILE: &str = "byz-master.json";
/// How often the master's stream renews its promise when it has nothing else to send (a
/// Lamport participant must keep moving, or promise not to send anything below some
/// timestamp).
const RENEW_EVERY: Duration = Duration::from_millis(100);
/// How often the ticker looks whether a new promise is due.
const TICK: Duration = Duration::from_millis(20);

struct StreamState {
    /// How long before the promise runs out the renewal goes out (`renew_lead`).
    renew_lead: u64,
    era: u64,
    session: u64,
    seq: u64,
    last_ts: u64,
    horizon: u64,
    endpoints: Vec<String>,
    channels: crate::Channels,
}

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct Persisted {
    /// Hex of the last SignedEra pushed.
    era: Option<String>,
    /// Replica public keys as first reported (hex).
    public_keys: BTreeMap<String, String>,
}

pub struct ByzMaster {
    /// `lockstep up`: where the key, state and client info live. None: the caller persists.
    dir: Option<PathBuf>,
    key: SigningKey,
    pub t: usize,
    pub ordering: Ordering,
    pub machine: MachineIdentity,
    name: String,
    era: Option<(Era, SignedEra)>,
    public_keys: BTreeMap<String, String>,
    stream: Arc<Mutex<StreamState>>,
    admitted: HashSet<(String, u64)>,
    tombstoned: BTreeMap<(String, u64, u64), Instant>,
    pub client_timeout: Duration,
    /// How the master calls the replicas (the admin certificate, or plaintext), one channel
    /// per replica.
    channels: crate::Channels,
}

fn now_us() -> u64 {
    lockstep_replica::byz::now_micros()
}

impl Ordering {
    /// The ordering's bounds for a cluster that tolerates `t` faults.
    pub fn timing(&self, t: usize) -> order::Timing {
        order::Timing {
            stability: order::Stability::parse(&self.stability).unwrap_or(order::Stability::Lamport),
            t,
            delay_us: self.max_delay_millis.saturating_mul(1000),
            skew_us: self.max_clock_skew_millis.saturating_mul(1000),
        }
    }
}

/// How long before the master's promise runs out its renewal is sent: the time a renewal
/// takes to be decided everywhere (`renew_ahead`, 6δ at t = 1), and never less than
/// `RENEW_EVERY`. The promise itself runs `RENEW_EVERY` beyond that, and the master's own
/// items (admissions, barriers) are placed at its end, so this is also their added latency.
/// A fixed lead of 100 ms let the promise lapse whenever a renewal took longer than that to be
/// decided (δ above about 13 ms at t = 1; the Kubernetes example's δ = 100 ms), and every
/// client's items then waited for the master's late renewal.
fn renew_lead(ordering: &Ordering, t: usize) -> u64 {
    let every = RENEW_EVERY.as_micros() as u64;
    lockstep_replica::byz::renew_ahead(&ordering.timing(t)).max(every)
}

impl ByzMaster {
    pub fn open(
        dir: &Path,
        name: &str,
        t: usize,
        ordering: Ordering,
        machine: MachineIdentity,
    ) -> anyhow::Result<ByzMaster> {
        let key = keys::load_or_create_signing_key(&dir.join(MASTER_KEY_FILE))?;
        // The CLI's own identity, so `lockstep -c NAME put ...` works out of the box.
        if !dir.join(IDENTITIES_DIR).join(crate::byz::DEFAULT_IDENTITY).exists() {
            crate::byz::add_client(dir, crate::byz::DEFAULT_IDENTITY)?;
        }
        let persisted: Persisted = match std::fs::read(dir.join(MASTER_STATE_FILE)) {
            Ok(b) => serde_json::from_slice(&b).context("byz-master.json is not readable")?,
            Err(_) => Persisted::default(),
        };
        let era = match &persisted.era {
            Some(h) => {
                let bytes = hex::decode(h).context("byz-master.json: era")?;
                let signed = SignedEra::decode(bytes.as_slice()).context("byz-master.json: era")?;
                let era = Era::decode(signed.era.as_slice()).context("byz-master.json: era")?;
                Some((era, signed))
            }
            None => None,
        };
        let mut m = ByzMaster::from_parts(key, name, t, ordering, machine, None, persisted.public_keys);
        m.dir = Some(dir.to_path_buf());
        m.era = era;
        Ok(m)
    }

    /// A master whose key and last signed era are kept by the caller (the operator: a Secret).
    pub fn from_parts(
        key: SigningKey,
        name: &str,
        t: usize,
        ordering: Ordering,
        machine: MachineIdentity,
        era: Option<SignedEra>,
        public_keys: BTreeMap<String, String>,
    ) -> ByzMaster {
        let era = era.and_then(|signed| Era::decode(signed.era.as_slice()).ok().map(|e| (e, signed)));
        let renew_lead = renew_lead(&ordering, t);
        ByzMaster {
            dir: None,
            key,
            t,
            ordering,
            machine,
            name: name.to_string(),
            era,
            public_keys,
            stream: Arc::new(Mutex::new(StreamState {
                renew_lead,
                era: 0,
                session: 0,
                seq: 0,
                last_ts: 0,
                horizon: 0,
                endpoints: Vec::new(),
                channels: crate::Channels::default(),
            })),
            admitted: HashSet::new(),
            tombstoned: BTreeMap::new(),
            client_timeout: Duration::from_secs(3),
            channels: crate::Channels::default(),
        }
    }

    /// Call the replicas with `transport` (plaintext by default).
    pub fn set_transport(&mut self, transport: crate::Transport) {
        let channels = crate::Channels::new(transport);
        self.stream.lock().unwrap_or_else(|e| e.into_inner()).channels = channels.clone();
        self.channels = channels;
    }

    /// The channels (and transport) the master calls the replicas over.
    pub fn channels(&self) -> &crate::Channels {
        &self.channels
    }

    pub fn public_key_hex(&self) -> String {
        hex::encode(self.key.verifying_key().to_bytes())
    }

    pub fn identities_dir(&self) -> PathBuf {
        self.dir.as_deref().unwrap_or(Path::new(".")).join(IDENTITIES_DIR)
    }

    /// The last era signed (the caller persists it before `open_era` pushes it).
    pub fn signed_era(&self) -> Option<&SignedEra> {
        self.era.as_ref().map(|(_, s)| s)
    }

    /// A replica's public key (hex), as the operator created it.
    pub fn set_public_key(&mut self, id: &str, hex_key: String) {
        self.public_keys.insert(id.to_string(), hex_key);
    }

    /// Whether the master's stream for the current era is running (opened or resumed).
    pub fn streaming(&self) -> bool {
        self.stream.lock().unwrap_or_else(|e| e.into_inner()).session != 0
    }

    /// Extra flags for a replica process.
    pub fn replica_args(&self) -> Vec<String> {
        vec![
            "--failure-model".into(),
            "Byzantine".into(),
            "--master-public-key".into(),
            self.public_key_hex(),
            "--client-identities".into(),
            self.identities_dir().display().to_string(),
            "--stability".into(),
            self.ordering.stability.clone(),
            "--max-delay-millis".into(),
            self.ordering.max_delay_millis.to_string(),
            "--max-clock-skew-millis".into(),
            self.ordering.max_clock_skew_millis.to_string(),
        ]
    }

    fn persist(&self) -> anyhow::Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let p = Persisted {
            era: self.era.as_ref().map(|(_, s)| hex::encode(s.encode_to_vec())),
            public_keys: self.public_keys.clone(),
        };
        lockstep_replica::write_atomically(&dir.join(MASTER_STATE_FILE), &serde_json::to_vec_pretty(&p)?)?;
        Ok(())
    }

    pub fn era_number(&self) -> u64 {
        self.era.as_ref().map_or(0, |(e, _)| e.number)
    }

    /// Remember each replica's public key the first time it reports one (the master started
    /// the process itself; on Kubernetes the operator creates the keys).
    pub fn learn_keys(&mut self, statuses: &BTreeMap<String, StatusResponse>) {
        let mut changed = false;
        for (id, s) in statuses {
            if let Some(b) = &s.byzantine
                && b.public_key.len() == 32
                && !self.public_keys.contains_key(id)
            {
                self.public_keys.insert(id.clone(), hex::encode(&b.public_key));
                changed = true;
            }
        }
        if changed {
            let _ = self.persist();
        }
    }

    /// Start the master's stream task (ticks). Call once; abort the handle to stop it.
    pub fn spawn_ticker(&self) -> tokio::task::JoinHandle<()> {
        let stream = self.stream.clone();
        let key = self.key.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(TICK).await;
                let due = {
                    let s = stream.lock().unwrap_or_else(|e| e.into_inner());
                    s.session != 0 && now_us() + s.renew_lead >= s.horizon
                };
                if due {
                    send(&stream, &key, Body::Noop(Noop {}));
                }
            }
        })
    }

    /// Sign and send the master stream's next item to every member of the era.
    fn send(&self, body: Body) {
        send(&self.stream, &self.key, body);
    }

    /// Admit pending opens and remove stalled streams, from what the replicas report (client
    /// keys from the local identity directory).
    pub fn on_statuses(&mut self, statuses: &BTreeMap<String, StatusResponse>) {
        let directory = keys::load_identity_dir(&self.identities_dir()).unwrap_or_default();
        self.on_statuses_with(statuses, &directory);
    }

    /// Whether some member reports an Open this master has not admitted yet (the operator
    /// reads the client identity Secret only then).
    pub fn has_unadmitted_opens(&self, statuses: &BTreeMap<String, StatusResponse>) -> bool {
        let era_no = self.era_number();
        statuses.values().filter_map(|s| s.byzantine.as_ref()).any(|b| {
            b.era == era_no
                && b.pending_opens.iter().any(|o| {
                    StreamItem::decode(o.item.as_slice())
                        .is_ok_and(|i| i.era == era_no && !self.admitted.contains(&(i.identity, i.session)))
                })
        })
    }

    /// `on_statuses` with the client identity directory given (identity -> public key).
    pub fn on_statuses_with(
        &mut self,
        statuses: &BTreeMap<String, StatusResponse>,
        directory: &BTreeMap<String, ed25519_dalek::VerifyingKey>,
    ) {
        if !self.streaming() {
            return;
        }
        let Some(reports) = self.stream_reports(statuses) else {
            return;
        };
        if reports.at_barrier {
            return;
        }
        self.admit(reports.opens, directory);
        self.remove_stalled(reports.stale);
    }

    /// What the members of the current era report about client streams; `None` without an
    /// era.
    fn stream_reports(&self, statuses: &BTreeMap<String, StatusResponse>) -> Option<StreamReports> {
        let (era, _) = self.era.as_ref()?;
        let era_no = era.number;
        let members: BTreeSet<String> = era.members.iter().map(|m| m.id.clone()).collect();
        let mut reports = StreamReports::default();
        for (id, s) in statuses {
            let Some(b) = &s.byzantine else { continue };
            if !members.contains(id) || b.era != era_no {
                continue;
            }
            reports.at_barrier |= b.barrier_index > 0;
            for o in &b.pending_opens {
                if let Ok(item) = StreamItem::decode(o.item.as_slice())
                    && item.era == era_no
                    && !self.admitted.contains(&(item.identity.clone(), item.session))
                {
                    reports
                        .opens
                        .entry((item.identity.clone(), item.session))
                        .or_insert_with(|| o.clone());
                }
            }
            for st in &b.streams {
                if st.identity != keys::MASTER_IDENTITY && st.idle_micros > self.client_timeout.as_micros() as u64 {
                    reports
                        .stale
                        .entry((st.identity.clone(), st.session))
                        .or_default()
                        .push(st.next_seq);
                }
            }
        }
        Some(reports)
    }

    /// Admit the pending opens signed by a client key in `directory`.
    fn admit(
        &mut self,
        opens: BTreeMap<(String, u64), SignedItem>,
        directory: &BTreeMap<String, ed25519_dalek::VerifyingKey>,
    ) {
        let floor_lead = self.floor_lead();
        for ((identity, session), open) in opens {
            let Some(key) = directory.get(&identity) else { continue };
            if !keys::verify(key, &open.item, &open.signature) {
                continue;
            }
            self.admitted.insert((identity, session));
            // The floor is the new stream's promise until its first item is decided, so it
            // counts from the admission's own timestamp: that is placed at the end of the
            // master's promise (up to `RENEW_EVERY + renew_lead` ahead), and runs no earlier. A floor counted from
            // the clock was already behind the clock when the admission ran, and the new
            // stream held every other stream back until its client had heard of the
            // admission and its first item was decided (64 clients opening at once: the
            // first writes waited up to a second, which was the bench's p99).
            send_with(&self.stream, &self.key, admission(open, key, floor_lead));
        }
    }

    /// How far ahead of an admission a new stream's floor lies, in microseconds.
    fn floor_lead(&self) -> u64 {
        // Once the admission ran, its client hears of it (δ), sends its first item (δ), and
        // that item is decided (2(t + 1)δ): `renew_ahead`; twice that and 10 ms for a loaded
        // machine. Not more: the first item is stamped at the floor and waits for it.
        // `PhysicalClock` waits for no promise: the floor only refuses items stamped before
        // the admission.
        let timing = self.ordering.timing(self.t);
        match timing.stability {
            order::Stability::Lamport => 2 * lockstep_replica::byz::renew_ahead(&timing) + 10_000,
            order::Stability::Physical => 0,
        }
    }

    /// Tombstone each stream that more than t members report idle past the client timeout, at
    /// most once every 5 s for the same sequence.
    fn remove_stalled(&mut self, stale: BTreeMap<(String, u64), Vec<u64>>) {
        for ((identity, session), mut seqs) in stale {
            if seqs.len() <= self.t {
                continue;
            }
            // The (t+1)-th highest: at least one correct replica has decided up to there.
            seqs.sort_unstable_by(|a, b| b.cmp(a));
            let seq = seqs[self.t];
            let slot = (identity.clone(), session, seq);
            if self
                .tombstoned
                .get(&slot)
                .is_some_and(|at| at.elapsed() < Duration::from_secs(5))
            {
                continue;
            }
            self.tombstoned.insert(slot, Instant::now());
            self.tombstone(identity, session, seq);
        }
    }

    /// Sign a tombstone for client stream `identity`/`session` at `seq` and submit it to every
    /// member.
    fn tombstone(&self, identity: String, session: u64, seq: u64) {
        let note = format!(
            "removing stalled client stream {identity}/{session} at sequence {seq} (no item for {:?})",
            self.client_timeout
        );
        if self.dir.is_some() {
            println!("  {note}");
        } else {
            tracing::info!(cluster = %self.name, "{note}");
        }
        let item = StreamItem {
            identity,
            session,
            seq,
            ts: now_us(),
            horizon: 0,
            era: self.era_number(),
            body: Some(Body::Tombstone(Tombstone {})),
        };
        let signed = lockstep_replica::byz::sign_item(&self.key, &item);
        submit_all(
            &self.channels,
            &self.stream.lock().unwrap_or_else(|e| e.into_inner()).endpoints,
            signed,
        );
    }

    /// Order a barrier (seal: also seal the runtime) and wait until t+1 members of the current
    /// era report the same index and digest there.
    pub async fn barrier(&mut self, seal: bool, timeout: Duration) -> anyhow::Result<(u64, Vec<u8>)> {
        let Some((era, _)) = self.era.clone() else {
            bail!("no era yet")
        };
        self.send(Body::Barrier(Barrier { seal }));
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.barrier_reached(&era).await {
                return Ok(found);
            }
            if Instant::now() > deadline {
                bail!(
                    "the barrier of era {} was not reached by {} members within {timeout:?}",
                    era.number,
                    self.t + 1
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// (index, digest) that t+1 members of `era` report at their barrier, if any.
    pub async fn barrier_reached(&self, era: &Era) -> Option<(u64, Vec<u8>)> {
        let probes = era
            .members
            .iter()
            .map(|m| async move { self.channels.status(&m.endpoint, Duration::from_millis(500)).await });
        let statuses: Vec<StatusResponse> = futures::future::join_all(probes).await.into_iter().flatten().collect();
        agreed_barrier(era, &statuses, self.t, |_, _| true)
    }

    /// (index, digest) of the barrier t + 1 members of the current era stopped at because
    /// its master stream ended (they no longer list it): no barrier can be ordered in that
    /// era, and the next one starts there (docs/byzantine.md, "When the master stream ends").
    pub fn ended_at_barrier(&self, statuses: &BTreeMap<String, StatusResponse>) -> Option<(u64, Vec<u8>)> {
        let (era, _) = self.era.as_ref()?;
        let members = statuses
            .iter()
            .filter(|(id, _)| era.members.iter().any(|m| m.id == **id))
            .map(|(_, s)| s);
        agreed_barrier(era, members, self.t, |_, b| {
            !b.streams
                .iter()
                .any(|st| st.identity == keys::MASTER_IDENTITY && st.session == era.master_session)
        })
    }

    /// Sign the era of `config` (starting at `start` with state `digest`), push it to its
    /// members and open a new master stream for it.
    pub async fn start_era(
        &mut self,
        config: &Config,
        start: u64,
        digest: Vec<u8>,
        resume: Option<MachineIdentity>,
    ) -> anyhow::Result<()> {
        self.sign_era(config, start, digest, resume)?;
        self.persist()?;
        self.open_era().await
    }

    /// Sign the era of `config` and make it the current one, without telling anyone yet: the
    /// caller persists it (`signed_era`) and then calls `open_era`.
    pub fn sign_era(
        &mut self,
        config: &Config,
        start: u64,
        digest: Vec<u8>,
        resume: Option<MachineIdentity>,
    ) -> anyhow::Result<()> {
        let mut members = Vec::new();
        for m in &config.members {
            let key = self
                .public_keys
                .get(&m.id)
                .with_context(|| format!("no public key known for {} yet", m.id))?;
            members.push(ByzMember {
                id: m.id.clone(),
                endpoint: m.endpoint.clone(),
                public_key: hex::decode(key)?,
            });
        }
        let session = (rand::random::<u64>() >> 1).max(1);
        let machine = resume.clone().unwrap_or_else(|| self.machine.clone());
        let era = Era {
            number: config.epoch,
            start_index: start,
            state_digest: digest,
            members,
            master_session: session,
            machine: Some(machine.clone()),
            resume: resume.is_some(),
            faults: self.t as u32,
            stability: self.ordering.stability.clone(),
            max_delay_micros: self.ordering.max_delay_millis.max(1) * 1000,
            max_skew_micros: self.ordering.max_clock_skew_millis * 1000,
        };
        let bytes = era.encode_to_vec();
        let signed = SignedEra {
            signature: keys::sign(&self.key, &bytes),
            era: bytes,
        };
        self.machine = machine;
        self.era = Some((era, signed));
        // Nothing of the new master stream goes out before the members hold the era.
        self.stream.lock().unwrap_or_else(|e| e.into_inner()).session = 0;
        self.admitted.clear();
        Ok(())
    }

    /// Push the current (signed, persisted) era to its members and open its master stream.
    pub async fn open_era(&mut self) -> anyhow::Result<()> {
        let Some((era, signed)) = self.era.clone() else {
            bail!("no era signed yet")
        };
        let session = era.master_session;
        let pushes = era.members.iter().map(|m| {
            let signed = signed.clone();
            let ep = m.endpoint.clone();
            let id = m.id.clone();
            let channels = self.channels.clone();
            async move { (id, push_era(&channels, &ep, signed, Duration::from_secs(30)).await) }
        });
        let mut ok = 0;
        let mut errors = Vec::new();
        for (id, r) in futures::future::join_all(pushes).await {
            match r {
                Ok(()) => ok += 1,
                Err(e) => errors.push(format!("{id}: {e}")),
            }
        }
        {
            let mut s = self.stream.lock().unwrap_or_else(|e| e.into_inner());
            *s = StreamState {
                renew_lead: s.renew_lead,
                era: era.number,
                session,
                seq: 0,
                last_ts: s.last_ts,
                horizon: 0,
                endpoints: era.members.iter().map(|m| m.endpoint.clone()).collect(),
                channels: self.channels.clone(),
            };
        }
        // Channels to replicas that left with the previous era go.
        self.channels
            .retain(|e| era.members.iter().any(|m| crate::endpoint_url(&m.endpoint) == e));
        self.write_info()?;
        if ok <= self.t {
            bail!("era {} reached only {ok} members: {}", era.number, errors.join("; "));
        }
        if !errors.is_empty() && self.dir.is_some() {
            println!("  era {}: not yet at {}", era.number, errors.join("; "));
        }
        Ok(())
    }

    /// After a fail-over (a new operator leader) the current era's master stream goes on
    /// where the old master left it: the sequence number and timestamp bound that t + 1 members
    /// of the era report identically. Correct members agree once relays settled (the delay
    /// bound), and t faulty ones cannot make up a value t + 1 report. False until then.
    pub fn resume_stream(&mut self, statuses: &BTreeMap<String, StatusResponse>) -> bool {
        let Some((era, _)) = &self.era else { return false };
        let members: BTreeSet<&str> = era.members.iter().map(|m| m.id.as_str()).collect();
        let reports: Vec<(u64, u64)> = statuses
            .iter()
            .filter(|(id, _)| members.contains(id.as_str()))
            .filter_map(|(_, s)| s.byzantine.as_ref())
            .filter(|b| b.era == era.number)
            .filter_map(|b| {
                b.streams
                    .iter()
                    .find(|st| st.identity == keys::MASTER_IDENTITY && st.session == era.master_session)
                    .map(|st| (st.next_seq, st.bound))
            })
            .collect();
        let mut counts: BTreeMap<(u64, u64), usize> = BTreeMap::new();
        for r in reports {
            *counts.entry(r).or_default() += 1;
        }
        let Some(((next_seq, bound), _)) = counts.into_iter().find(|(_, n)| *n > self.t) else {
            return false;
        };
        let mut s = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        *s = StreamState {
            renew_lead: s.renew_lead,
            era: era.number,
            session: era.master_session,
            seq: next_seq.saturating_sub(1),
            last_ts: bound.saturating_sub(1),
            horizon: bound,
            endpoints: era.members.iter().map(|m| m.endpoint.clone()).collect(),
            channels: self.channels.clone(),
        };
        true
    }

    /// The state the next era starts from: the current era's barrier (ordered now unless t + 1
    /// members already stand at one), or, before the first era, the state t + 1 replicas hold
    /// (`genesis_state`).
    ///
    /// After a full-cluster restart (the current era lost its members: t + 1 of the next
    /// era's report no era at all) no barrier can be ordered; the next era then starts where
    /// t + 1 of them can rebuild the same state (`recovery_state`).
    pub async fn next_era_state(&mut self, endpoints: &[String], timeout: Duration) -> anyhow::Result<(u64, Vec<u8>)> {
        let Some(era) = self.current_era().cloned() else {
            return genesis_state(self.channels.transport(), endpoints, self.t, timeout)
                .await
                .context("no t + 1 replicas hold the same initial state yet");
        };
        if let Some(at) = self.barrier_reached(&era).await {
            return Ok(at);
        }
        // Only the era's own members hold its state (a newcomer in `endpoints` holds none).
        // They are asked at the addresses they have now (`lockstep up` gives a restarted
        // replica a new port) and known by id.
        let replicas = statuses_at(self.channels.transport(), endpoints, Duration::from_millis(500)).await;
        let replicas: Vec<(String, StatusResponse)> =
            replicas.into_iter().filter(|(_, s)| holds_era(&era, s)).collect();
        match era_standing(&era, replicas.iter().map(|(_, s)| s), self.t) {
            EraStanding::Running => self.barrier(false, timeout).await,
            EraStanding::Restarted => recovery_state(self.channels.transport(), &replicas, self.t, timeout)
                .await
                .with_context(|| {
                    format!(
                        "era {} lost its members (a full-cluster restart) and no t + 1 replicas rebuild the same state yet",
                        era.number
                    )
                }),
            // No barrier can be reached now; ordering one would only wait out its timeout.
            EraStanding::Short(n) => bail!(
                "only {n} replicas answer as members of era {}; its barrier needs {}",
                era.number,
                self.t + 1
            ),
        }
    }

    /// Re-send the current era to one replica.
    pub async fn push_current(&self, endpoint: &str) -> anyhow::Result<()> {
        let Some((_, signed)) = &self.era else { return Ok(()) };
        push_era(&self.channels, endpoint, signed.clone(), Duration::from_secs(5))
            .await
            .map_err(anyhow::Error::msg)
    }

    pub fn current_era(&self) -> Option<&Era> {
        self.era.as_ref().map(|(e, _)| e)
    }

    fn write_info(&self) -> anyhow::Result<()> {
        let (Some((era, _)), Some(dir)) = (&self.era, &self.dir) else {
            return Ok(());
        };
        let info = ClusterInfo {
            name: self.name.clone(),
            t: self.t,
            era: era.number,
            replicas: era
                .members
                .iter()
                .map(|m| ReplicaInfo {
                    id: m.id.clone(),
                    endpoint: m.endpoint.clone(),
                    public_key: hex::encode(&m.public_key),
                })
                .collect(),
            stability: self.ordering.stability.clone(),
            max_delay_millis: self.ordering.max_delay_millis,
            max_skew_millis: self.ordering.max_clock_skew_millis,
            machine_name: self.machine.name.clone(),
            machine_version: self.machine.version.clone(),
        };
        lockstep_replica::write_atomically(&dir.join(INFO_FILE), &serde_json::to_vec_pretty(&info)?)?;
        Ok(())
    }
}

/// Status of each replica at `endpoints` that answers: (endpoint, status).
pub async fn statuses_at(
    transport: &crate::Transport,
    endpoints: &[String],
    timeout: Duration,
) -> Vec<(String, StatusResponse)> {
    let probes = endpoints.iter().map(|ep| async move {
        let status = crate::status_of(transport, ep, timeout).await.ok()?;
        Some((ep.clone(), status))
    });
    futures::future::join_all(probes).await.into_iter().flatten().collect()
}

/// Before the first era: the (index, digest) of the state t + 1 replicas serve as their
/// snapshot at their own applied index (new replicas: the machine's empty state at 0). The
/// master does not need to know the machine: a custom image's empty state is what its replicas
/// report. None until t + 1 agree. (`recovery_state` over replicas that can rebuild only their
/// current index.)
pub async fn genesis_state(
    transport: &crate::Transport,
    endpoints: &[String],
    t: usize,
    timeout: Duration,
) -> Option<(u64, Vec<u8>)> {
    let replicas = statuses_at(transport, endpoints, timeout).await;
    recovery_state(transport, &replicas, t, timeout).await
}

/// (index, digest) of the barrier of `era` that t + 1 of `statuses` (its members' answers)
/// report, counting only those `counts` accepts.
pub fn agreed_barrier<'a>(
    era: &Era,
    statuses: impl IntoIterator<Item = &'a StatusResponse>,
    t: usize,
    counts: impl Fn(&StatusResponse, &ByzStatus) -> bool,
) -> Option<(u64, Vec<u8>)> {
    let mut tally: BTreeMap<(u64, Vec<u8>), usize> = BTreeMap::new();
    for s in statuses {
        if let Some(b) = &s.byzantine
            && b.era == era.number
            && b.barrier_index > 0
            && counts(s, b)
        {
            *tally.entry((b.barrier_index, b.barrier_digest.clone())).or_default() += 1;
        }
    }
    tally.into_iter().find(|(_, n)| *n > t).map(|(k, _)| k)
}

/// Whether an era can still reach a barrier, from its replicas' statuses.
#[derive(Debug, PartialEq, Eq)]
pub enum EraStanding {
    /// t + 1 replicas answer as its members.
    Running,
    /// At most t do, and t + 1 of its members report that they restarted out of it (on their
    /// disks, waiting for the master: a full-cluster restart). Its streams and relays are gone.
    Restarted,
    /// Only this many answer as members, and not enough report a restart: wait.
    Short(usize),
}

/// Whether the replica of `status` is a member of `era` that is in it or restarted out of it
/// (and so holds its state up to some index).
pub fn holds_era(era: &Era, status: &StatusResponse) -> bool {
    era.members.iter().any(|m| m.id == status.id)
        && status
            .byzantine
            .as_ref()
            .is_some_and(|b| b.era == era.number || (b.era == 0 && b.left_era == era.number))
}

/// Counts only `era`'s members: a replica that never joined it (a newcomer, or one its push
/// never reached) holds nothing of it, and counting it as restarted would let fresh replicas
/// vouch for the empty state. Sealed replicas restarted by a rollout are not a restart to
/// recover from.
pub fn era_standing<'a>(era: &Era, statuses: impl IntoIterator<Item = &'a StatusResponse>, t: usize) -> EraStanding {
    let (mut in_era, mut restarted) = (0, 0);
    for s in statuses.into_iter().filter(|s| holds_era(era, s)) {
        let b = s.byzantine.as_ref().map_or(0, |b| b.era);
        in_era += usize::from(b == era.number);
        // A sealed replica restarted on purpose (a lockstep rollout): the resume path starts
        // the next era from the sealing barrier.
        restarted += usize::from(b == 0 && s.sealed_at == 0);
    }
    match (in_era > t, restarted > t) {
        (true, _) => EraStanding::Running,
        (false, true) => EraStanding::Restarted,
        (false, false) => EraStanding::Short(in_era),
    }
}

/// The highest index at which t + 1 of `replicas` (endpoint, status) rebuild the same state,
/// and its digest. A replica restarted on its disk can rebuild any
/// index from its snapshot to the end of its log (`recoverable_from..=applied_index` in its
/// status; a new one, or one in an era, only its current index). Correct replicas hold prefixes of one order, so
/// their states at an index agree, and t faulty ones cannot make up a digest that t + 1
/// report. Candidates are tried from the highest down, since a faulty replica may claim a
/// range and then serve something else. None until t + 1 agree.
///
/// What a recovery era keeps: every entry that t + 1 replicas still hold. A command answered
/// before the restart (t + 1 replicas made it durable first) is lost only if some of those
/// that answered it are faulty and now hide it (docs/byzantine.md, "Full-cluster restart").
pub async fn recovery_state(
    transport: &crate::Transport,
    replicas: &[(String, StatusResponse)],
    t: usize,
    timeout: Duration,
) -> Option<(u64, Vec<u8>)> {
    let ranges: Vec<(&str, u64, u64)> = replicas
        .iter()
        .filter_map(|(endpoint, s)| {
            let b = s.byzantine.as_ref()?;
            Some((
                endpoint.as_str(),
                b.recoverable_from.min(s.applied_index),
                s.applied_index,
            ))
        })
        .collect();
    let mut candidates: Vec<u64> = ranges.iter().map(|r| r.2).collect();
    candidates.sort_unstable_by(|a, b| b.cmp(a));
    candidates.dedup();
    for at in candidates {
        let covering: Vec<&str> = ranges
            .iter()
            .filter(|(_, from, to)| (*from..=*to).contains(&at))
            .map(|r| r.0)
            .collect();
        if covering.len() <= t {
            continue;
        }
        let probes = covering.iter().map(|ep| state_digest_at(transport, ep, at, timeout));
        let mut counts: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
        for d in futures::future::join_all(probes).await.into_iter().flatten() {
            *counts.entry(d).or_default() += 1;
        }
        if let Some((digest, _)) = counts.into_iter().find(|(_, n)| *n > t) {
            return Some((at, digest));
        }
    }
    None
}

/// The digest of the state the replica at `endpoint` serves at `index`.
async fn state_digest_at(
    transport: &crate::Transport,
    endpoint: &str,
    index: u64,
    timeout: Duration,
) -> Option<Vec<u8>> {
    let ch = crate::cluster_channel(transport, endpoint).ok()?;
    let mut c = ByzantineClient::new(ch).max_decoding_message_size(lockstep_proto::MAX_MESSAGE_BYTES);
    let mut req = tonic::Request::new(lockstep_proto::FetchSnapshotRequest { index });
    req.set_timeout(timeout);
    let snap = c.fetch_snapshot(req).await.ok()?.into_inner();
    (snap.index == index).then(|| lockstep_replica::runtime::digest(&snap.data))
}

fn send(stream: &Mutex<StreamState>, key: &SigningKey, body: Body) {
    send_with(stream, key, |_| body);
}

/// What the members of the current era report about client streams.
#[derive(Default)]
struct StreamReports {
    /// Opens not admitted yet, one per (identity, session).
    opens: BTreeMap<(String, u64), SignedItem>,
    /// Per stream idle past the client timeout: the next sequence each member reporting it
    /// expects.
    stale: BTreeMap<(String, u64), Vec<u64>>,
    /// Some member is at a barrier: no admissions or removals then.
    at_barrier: bool,
}

/// The admission of a stream, for its timestamp: its floor `floor_lead` after it.
fn admission(open: SignedItem, key: &ed25519_dalek::VerifyingKey, floor_lead: u64) -> impl FnOnce(u64) -> Body {
    let public_key = key.to_bytes().to_vec();
    move |ts| {
        Body::Admit(Admit {
            open: Some(open),
            public_key,
            floor: ts.saturating_add(floor_lead),
        })
    }
}

/// Sign and send the master stream's next item, its body made from the item's timestamp.
fn send_with(stream: &Mutex<StreamState>, key: &SigningKey, body: impl FnOnce(u64) -> Body) {
    let (signed, endpoints, channels) = {
        let mut s = stream.lock().unwrap_or_else(|e| e.into_inner());
        if s.session == 0 {
            return;
        }
        (next_item(&mut s, key, body), s.endpoints.clone(), s.channels.clone())
    };
    submit_all(&channels, &endpoints, signed);
}

/// Stamp and sign the master stream's next item.
fn next_item(s: &mut StreamState, key: &SigningKey, body: impl FnOnce(u64) -> Body) -> SignedItem {
    {
        s.seq += 1;
        // Keep the promise of the previous item.
        let now = now_us();
        let ts = now.max(s.last_ts + 1).max(s.horizon);
        s.last_ts = ts;
        // Promise: nothing from the master below this.
        let promise = (RENEW_EVERY.as_micros() as u64).saturating_add(s.renew_lead);
        s.horizon = lockstep_replica::byz::next_horizon(now, ts, promise);
        let item = StreamItem {
            identity: keys::MASTER_IDENTITY.into(),
            session: s.session,
            seq: s.seq,
            ts,
            horizon: s.horizon,
            era: s.era,
            body: Some(body(ts)),
        };
        lockstep_replica::byz::sign_item(key, &item)
    }
}

fn submit_all(channels: &crate::Channels, endpoints: &[String], signed: SignedItem) {
    for ep in endpoints {
        let Ok(ch) = channels.get(ep) else {
            continue;
        };
        let mut c = ByzantineClient::new(ch);
        let mut req = tonic::Request::new(signed.clone());
        req.set_timeout(Duration::from_secs(2));
        tokio::spawn(async move {
            let _ = c.submit(req).await;
        });
    }
}

async fn push_era(
    channels: &crate::Channels,
    endpoint: &str,
    signed: SignedEra,
    timeout: Duration,
) -> Result<(), String> {
    let ch = channels.get(endpoint).map_err(|e| e.to_string())?;
    let mut c = ByzantineClient::new(ch).max_decoding_message_size(lockstep_proto::MAX_MESSAGE_BYTES);
    let mut req = tonic::Request::new(signed);
    req.set_timeout(timeout);
    match tokio::time::timeout(timeout, c.start_era(req)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(s)) => Err(s.message().to_string()),
        Err(_) => Err("timed out".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// The master's promise runs `RENEW_EVERY + renew_lead` ahead, so an admission is stamped
    /// (and runs) that far in the future; the new stream's floor must lie beyond that, or the
    /// stream is behind the clock from the moment it is admitted and holds everyone back.
    #[test]
    fn an_admission_floor_lies_beyond_the_admission_itself() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let client = SigningKey::from_bytes(&[8; 32]);
        let now = now_us();
        let promise = 200_000;
        let mut s = StreamState {
            renew_lead: 100_000,
            era: 1,
            session: 5,
            seq: 3,
            last_ts: now,
            horizon: now + promise,
            endpoints: Vec::new(),
            channels: crate::Channels::default(),
        };
        let open = lockstep_replica::byz::sign_item(&client, &StreamItem::default());
        let lead = 82_000;
        let signed = next_item(&mut s, &key, admission(open, &client.verifying_key(), lead));
        let item = StreamItem::decode(signed.item.as_slice()).expect("item");
        let Some(Body::Admit(a)) = item.body else {
            panic!("an admission")
        };
        assert!(item.ts >= now + promise);
        assert_eq!(a.floor, item.ts + lead);
    }

    fn ordering(stability: &str, delay_ms: u64) -> Ordering {
        Ordering {
            stability: stability.into(),
            max_delay_millis: delay_ms,
            max_clock_skew_millis: 0,
        }
    }

    /// A renewal must be decided everywhere before the promise it renews runs out: it goes
    /// out at least `renew_ahead` (the decision time) before, for any δ.
    #[test]
    fn the_master_renews_its_promise_a_decision_time_ahead() {
        // Small δ: the decision takes 12 ms, the renewal goes 100 ms ahead (as before).
        assert_eq!(renew_lead(&ordering("LamportClock", 2), 1), 100_000);
        // The Kubernetes example's δ = 100 ms: a decision takes 6δ at t = 1, 8δ at t = 2.
        for (t, ahead) in [(1, 600_000), (2, 800_000)] {
            let o = ordering("LamportClock", 100);
            assert_eq!(lockstep_replica::byz::renew_ahead(&o.timing(t)), ahead);
            assert_eq!(renew_lead(&o, t), ahead);
        }
        // PhysicalClock waits for no promise.
        assert_eq!(renew_lead(&ordering("PhysicalClock", 500), 1), 100_000);
    }

    fn member_status(id: &str, era: u64, left_era: u64) -> StatusResponse {
        StatusResponse {
            id: id.into(),
            byzantine: Some(lockstep_proto::ByzStatus {
                era,
                left_era,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn era_with(number: u64, ids: &[&str]) -> Era {
        Era {
            number,
            members: ids
                .iter()
                .map(|id| lockstep_proto::ByzMember {
                    id: id.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    /// An era is restarted only when t + 1 of its own members restarted out of it; fresh
    /// replicas (a newcomer, a member the era never reached) report no era too, but hold none
    /// of its state, and must never be counted: two of them would vouch for the empty state.
    #[test]
    fn only_members_that_left_the_era_make_it_restarted() {
        let era = era_with(7, &["a", "b", "c"]);
        let standing = |s: &[StatusResponse]| era_standing(&era, s.iter(), 1);
        // Every member restarted out of era 7.
        let all = [
            member_status("a", 0, 7),
            member_status("b", 0, 7),
            member_status("c", 0, 7),
        ];
        assert_eq!(standing(&all), EraStanding::Restarted);
        // Two still in it: it runs.
        let two = [
            member_status("a", 7, 0),
            member_status("b", 7, 0),
            member_status("c", 0, 7),
        ];
        assert_eq!(standing(&two), EraStanding::Running);
        // One left in it, the others fresh (never joined era 7) or newcomers: wait, never recover.
        let fresh = [
            member_status("a", 7, 0),
            member_status("b", 0, 0),
            member_status("c", 0, 6),
            member_status("new-1", 0, 0),
            member_status("new-2", 0, 0),
        ];
        assert_eq!(standing(&fresh), EraStanding::Short(1));
        // Restarted sealed, on a new image (a rollout): the resume path's, not a recovery.
        let sealed: Vec<StatusResponse> = all
            .iter()
            .cloned()
            .map(|s| StatusResponse { sealed_at: 40, ..s })
            .collect();
        assert_eq!(standing(&sealed), EraStanding::Short(0));
    }
}
