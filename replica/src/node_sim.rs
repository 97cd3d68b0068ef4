//! Randomised simulation of the fail-stop protocol core: three `Node`s, a configuration
//! master, and a network that delays, reorders, duplicates and drops messages. The master
//! fails up to t = 2 voters at random moments (fencing them with a new epoch, pushing the
//! configuration to a random subset of survivors first). Checked after every step: no two
//! replicas disagree on a committed index; at the end (faults stop, the network heals):
//! every acknowledged write is in the surviving primary's state and every survivor agrees.
use super::*;
use crate::machine::kv::Kv;
use lockstep_proto::Member;
use proptest::prelude::*;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

enum Msg {
    /// primary -> peer, with the epoch and read round it was sent at.
    Request {
        from: usize,
        to: usize,
        epoch: u64,
        round: u64,
        msg: PeerMessage,
    },
    Response {
        to: usize,
        from: usize,
        epoch: u64,
        round: u64,
        resp: AppendResponse,
    },
}

const IDS: [&str; 3] = ["a", "b", "c"];

fn config(epoch: u64, primary: usize, voters: &[usize]) -> Configuration {
    Configuration {
        epoch,
        primary_id: IDS[primary].into(),
        members: voters
            .iter()
            .map(|&v| Member {
                id: IDS[v].into(),
                endpoint: format!("http://{}", IDS[v]),
                role: MemberRole::Voter as i32,
            })
            .collect(),
    }
}

fn committed_prefix(n: &Node) -> Vec<(u64, u64)> {
    (n.log_start..=n.commit_index.min(n.last_index()))
        .filter_map(|i| n.entry(i).map(|e| (e.index, e.epoch)))
        .collect()
}

fn run(seed: u64, steps: usize) {
    let mut rng = Rng(seed | 1);
    let (tx, _) = broadcast::channel(1 << 16);
    let mut nodes: Vec<Node> = IDS
        .iter()
        .map(|id| Node::new(id.to_string(), Runtime::new(Box::new(Kv::default())), 1_000_000, true))
        .collect();
    let mut alive = [true; 3];
    let mut epoch = 1;
    let mut primary = 0;
    let mut voters = vec![0, 1, 2];
    for n in nodes.iter_mut() {
        n.reconfigure(config(epoch, primary, &voters)).expect("bootstrap");
    }
    let mut net: Vec<Msg> = Vec::new();
    type Answer = oneshot::Receiver<Result<(u64, Vec<u8>), Status>>;
    let mut pending: Vec<(String, Answer)> = Vec::new();
    let mut acked: Vec<String> = Vec::new();
    let mut writes = 0u64;

    for step in 0..steps {
        match rng.below(100) {
            // A client write at whoever the master says is primary.
            0..=19 => {
                writes += 1;
                let key = format!("k{writes}");
                let cmd = Command {
                    client_id: format!("c{writes}"),
                    sequence: 1,
                    payload: serde_json::json!({"op": "put", "key": key, "value": "v"})
                        .to_string()
                        .into_bytes(),
                };
                let (reply, rx) = oneshot::channel();
                if nodes[primary].propose(cmd, reply).is_ok() {
                    pending.push((key, rx));
                }
            }
            // The primary (or a fenced old one) sends to a peer.
            20..=44 => {
                let from = rng.below(3);
                let to = rng.below(3);
                if from != to && alive[from] {
                    let round = nodes[from].read_round();
                    if let Some(msg) = nodes[from].next_message(IDS[to], rng.chance(30)) {
                        let round = if let PeerMessage::Append(_, r) = &msg {
                            *r
                        } else {
                            round
                        };
                        net.push(Msg::Request {
                            from,
                            to,
                            epoch: nodes[from].epoch,
                            round,
                            msg,
                        });
                    }
                }
            }
            // Deliver (or drop, or duplicate) a random message.
            45..=74 if !net.is_empty() => {
                let i = rng.below(net.len());
                let m = net.swap_remove(i);
                if rng.chance(5) {
                    // Lost: the sender's RPC times out.
                    match m {
                        Msg::Request { from, to, .. } | Msg::Response { to: from, from: to, .. } if alive[from] => {
                            nodes[from].on_peer_unreachable(IDS[to]);
                        }
                        _ => {}
                    }
                    continue;
                }
                match m {
                    Msg::Request { from, to, .. } if !alive[to] && alive[from] => {
                        nodes[from].on_peer_unreachable(IDS[to]); // connection refused
                    }
                    Msg::Request { to, .. } if !alive[to] => {}
                    Msg::Request {
                        from,
                        to,
                        epoch,
                        round,
                        msg,
                    } => {
                        let (resp, _ops) = match msg {
                            PeerMessage::Append(req, _) => nodes[to].handle_append(req),
                            PeerMessage::Snapshot(req) => nodes[to].handle_install(req),
                        };
                        // Backups acknowledge only what is durable: model the fsync here.
                        let last = nodes[to].last_index();
                        nodes[to].on_durable(last);
                        nodes[to].apply_committed(&tx);
                        net.push(Msg::Response {
                            to: from,
                            from: to,
                            epoch,
                            round,
                            resp,
                        });
                    }
                    Msg::Response {
                        to,
                        from,
                        epoch,
                        round,
                        resp,
                    } if alive[to] => {
                        nodes[to].on_peer_response(IDS[from], epoch, round, &resp);
                        nodes[to].apply_committed(&tx);
                        if rng.chance(5) {
                            net.push(Msg::Response {
                                to,
                                from,
                                epoch,
                                round,
                                resp,
                            }); // duplicate
                        }
                    }
                    _ => {}
                }
            }
            // Local fsync + apply.
            75..=89 => {
                let i = rng.below(3);
                if alive[i] {
                    let last = nodes[i].last_index();
                    nodes[i].on_durable(last);
                    nodes[i].apply_committed(&tx);
                }
            }
            // The master: fail a voter (at most t = 2 in total), fence with a new epoch.
            90..=92 if voters.len() > 1 => {
                let victim = voters[rng.below(voters.len())];
                alive[victim] = false;
                voters.retain(|&v| v != victim);
                epoch += 1;
                // Any surviving voter holds every acknowledged write.
                primary = if voters.contains(&primary) {
                    primary
                } else {
                    voters[rng.below(voters.len())]
                };
                let c = config(epoch, primary, &voters);
                for &v in &voters {
                    if v == primary || rng.chance(50) {
                        nodes[v].reconfigure(c.clone()).expect("newer epoch");
                    }
                }
            }
            // The master re-pushes the configuration to a lagging member.
            _ => {
                let v = voters[rng.below(voters.len())];
                if nodes[v].epoch < epoch {
                    nodes[v]
                        .reconfigure(config(epoch, primary, &voters))
                        .expect("newer epoch");
                }
            }
        }
        // Answers that came back.
        pending.retain_mut(|(key, rx)| match rx.try_recv() {
            Ok(Ok(_)) => {
                acked.push(key.clone());
                false
            }
            Ok(Err(_)) => false,
            Err(oneshot::error::TryRecvError::Empty) => true,
            Err(oneshot::error::TryRecvError::Closed) => false,
        });
        // Agreement on committed indexes, pairwise among live replicas.
        if step % 10 != 0 {
            continue;
        }
        let live: Vec<usize> = (0..3).filter(|&i| alive[i]).collect();
        for &i in &live {
            for &j in &live {
                let (pi, pj) = (committed_prefix(&nodes[i]), committed_prefix(&nodes[j]));
                for (x, y) in pi.iter().zip(pj.iter()) {
                    if x.0 == y.0 {
                        assert_eq!(
                            x, y,
                            "seed {seed}: {} and {} disagree on committed index {}",
                            IDS[i], IDS[j], x.0
                        );
                    }
                }
            }
        }
    }

    // Heal: everyone alive gets the latest configuration, the network delivers in order.
    for &v in &voters {
        if nodes[v].epoch < epoch {
            nodes[v]
                .reconfigure(config(epoch, primary, &voters))
                .expect("newer epoch");
        }
    }
    for _ in 0..50 {
        for &v in &voters {
            if v == primary {
                continue;
            }
            while let Some(msg) = nodes[primary].next_message(IDS[v], true) {
                let (resp, round) = match msg {
                    PeerMessage::Append(req, round) => (nodes[v].handle_append(req).0, round),
                    PeerMessage::Snapshot(req) => (nodes[v].handle_install(req).0, 0),
                };
                let last = nodes[v].last_index();
                nodes[v].on_durable(last);
                nodes[v].apply_committed(&tx);
                let e = nodes[primary].epoch;
                nodes[primary].on_peer_response(IDS[v], e, round, &resp);
                if resp.success && resp.match_index >= nodes[primary].last_index() {
                    break;
                }
            }
        }
        let last = nodes[primary].last_index();
        nodes[primary].on_durable(last);
        nodes[primary].apply_committed(&tx);
    }
    for (key, mut rx) in pending {
        if let Ok(Ok(_)) = rx.try_recv() {
            acked.push(key);
        }
    }
    let p = &nodes[primary];
    assert_eq!(p.role, Role::Primary, "seed {seed}");
    for key in &acked {
        let got = p
            .runtime
            .query(serde_json::json!({"op": "get", "key": key}).to_string().as_bytes())
            .expect("query");
        assert_eq!(
            got, br#"{"value":"v"}"#,
            "seed {seed}: acknowledged write {key} lost (primary {})",
            IDS[primary]
        );
    }
    for &v in &voters {
        assert_eq!(
            nodes[v].applied_index, p.applied_index,
            "seed {seed}: {} did not converge",
            IDS[v]
        );
        assert_eq!(
            nodes[v].runtime.snapshot(),
            p.runtime.snapshot(),
            "seed {seed}: {} diverged",
            IDS[v]
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 100, ..ProptestConfig::default() })]
    #[test]
    fn no_acknowledged_write_is_lost_and_replicas_agree(seed in any::<u64>()) {
        run(seed, 1000);
    }
}
