//! `lockstep-replica`: one replica process running a built-in state machine.
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "lockstep-replica",
    version,
    about = "A lockstep replica: runs a replicated deterministic state machine"
)]
struct Cli {
    #[command(flatten)]
    args: lockstep_replica::ReplicaArgs,
}

// mimalloc, its arena committed on demand (docs/benchmarks.md, "Allocator").
lockstep_replica::global_allocator!();

fn main() {
    let cli = Cli::parse();
    if let Err(e) = lockstep_replica::main_with(cli.args, &lockstep_replica::builtin_machines()) {
        eprintln!("lockstep-replica: error: {e:#}");
        std::process::exit(2);
    }
}
