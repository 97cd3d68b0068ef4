//! A new release of a state machine: the built-in `kv`, shipped as version 1.1.0.
//!
//! This is what your next release looks like to lockstep: a replica binary whose machine
//! reports a new identity (name, version, digest). The command format is the same, so 1.1.0
//! restores 1.0.0's snapshot at the seal of a lockstep rollout and carries on. The Kubernetes
//! end-to-end suite builds this example into the `lockstep-replica:e2e-next` image, so its
//! rollout test upgrades to a replica that really runs another version — and checks that the
//! operator believes what the replicas report, not what the pod spec says.
//!
//! ```sh
//! cargo run --example kv_next -p lockstep-replica -- --id kv-0 --data-dir /tmp/kv-0 --machine kv
//! ```

use clap::Parser;
use lockstep_proto::MachineIdentity;
use lockstep_replica::machine::kv::Kv;
use lockstep_replica::machine::{MachineError, StateMachine, identity};

const VERSION: &str = "1.1.0";

#[derive(Default)]
struct KvNext(Kv);

impl StateMachine for KvNext {
    fn identity(&self) -> MachineIdentity {
        let current = self.0.identity();
        identity(&current.name, VERSION, "json-v1")
    }
    fn validate(&self, command: &[u8]) -> Result<(), MachineError> {
        self.0.validate(command)
    }
    fn apply(&mut self, command: &[u8]) -> Vec<u8> {
        self.0.apply(command)
    }
    fn query(&self, query: &[u8]) -> Result<Vec<u8>, MachineError> {
        self.0.query(query)
    }
    fn snapshot(&self) -> Vec<u8> {
        self.0.snapshot()
    }
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), MachineError> {
        self.0.restore(snapshot)
    }
}

#[derive(Parser)]
#[command(name = "lockstep-replica", version = VERSION, about = "lockstep replica with kv 1.1.0")]
struct Cli {
    #[command(flatten)]
    args: lockstep_replica::ReplicaArgs,
}

// mimalloc, its arena committed on demand (docs/benchmarks.md, "Allocator").
lockstep_replica::global_allocator!();

fn main() {
    let cli = Cli::parse();
    let machines: &[(&str, lockstep_replica::machine::MachineFactory)] = &[("kv", || Box::new(KvNext::default()))];
    if let Err(e) = lockstep_replica::main_with(cli.args, machines) {
        eprintln!("lockstep-replica: error: {e:#}");
        std::process::exit(2);
    }
}
