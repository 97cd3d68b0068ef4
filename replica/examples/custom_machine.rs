//! Your own state machine in your own replica binary.
//!
//! A tiny bank: accounts with balances and transfers that never overdraw. Build and run one
//! replica of it:
//!
//! ```sh
//! cargo run --example custom_machine -p lockstep-replica -- --id bank-0 --data-dir /tmp/bank-0 --machine bank
//! ```
//!
//! The binary accepts the same flags as `lockstep-replica`; a cluster of it is configured by
//! the operator (set `machine.image` to an image built from this binary) or by any master
//! that speaks the admin API.

use clap::Parser;
use lockstep_proto::MachineIdentity;
use lockstep_replica::machine::{MachineError, StateMachine, identity};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Default)]
struct Bank {
    balances: BTreeMap<String, u64>,
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
enum BankCommand {
    Deposit { account: String, amount: u64 },
    Transfer { from: String, to: String, amount: u64 },
}

impl StateMachine for Bank {
    fn identity(&self) -> MachineIdentity {
        identity("bank", "1.0.0", "json-v1")
    }

    fn validate(&self, command: &[u8]) -> Result<(), MachineError> {
        serde_json::from_slice::<BankCommand>(command)
            .map(|_| ())
            .map_err(|e| MachineError(format!("bank: {e}")))
    }

    fn apply(&mut self, command: &[u8]) -> Vec<u8> {
        let out = match serde_json::from_slice::<BankCommand>(command) {
            Ok(BankCommand::Deposit { account, amount }) => {
                let b = self.balances.entry(account).or_default();
                *b = b.saturating_add(amount);
                serde_json::json!({"balance": *b})
            }
            Ok(BankCommand::Transfer { from, to, amount }) => {
                let have = self.balances.get(&from).copied().unwrap_or(0);
                if have < amount {
                    serde_json::json!({"ok": false, "reason": "insufficient funds", "balance": have})
                } else {
                    self.balances.insert(from, have - amount);
                    let b = self.balances.entry(to).or_default();
                    *b = b.saturating_add(amount);
                    serde_json::json!({"ok": true})
                }
            }
            Err(e) => serde_json::json!({"error": e.to_string()}),
        };
        out.to_string().into_bytes()
    }

    fn query(&self, query: &[u8]) -> Result<Vec<u8>, MachineError> {
        let account = String::from_utf8_lossy(query);
        Ok(
            serde_json::json!({"balance": self.balances.get(account.as_ref()).copied().unwrap_or(0)})
                .to_string()
                .into_bytes(),
        )
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&self.balances).unwrap_or_default()
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), MachineError> {
        self.balances = serde_json::from_slice(snapshot).map_err(|e| MachineError(format!("bank snapshot: {e}")))?;
        Ok(())
    }
}

#[derive(Parser)]
#[command(name = "bank-replica", about = "A lockstep replica running the bank machine")]
struct Cli {
    #[command(flatten)]
    args: lockstep_replica::ReplicaArgs,
}

fn main() {
    let cli = Cli::parse();
    let machines: &[(&str, lockstep_replica::machine::MachineFactory)] = &[("bank", || Box::new(Bank::default()))];
    if let Err(e) = lockstep_replica::main_with(cli.args, machines) {
        eprintln!("bank-replica: error: {e:#}");
        std::process::exit(2);
    }
}
