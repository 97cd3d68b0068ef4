//! `lockstep-check FILE [--max-steps N] [--max-cache N] [--max-cache-mib N]`: checks a key-value
//! history for linearizability. Exit status: 0 linearizable, 1 not linearizable, 2 inconclusive
//! or error.

use lockstep_linearizability::{CheckLimits, CheckResult, check_kv, parse_history};
use std::io::BufReader;
use std::process::ExitCode;

const USAGE: &str = "usage: lockstep-check FILE [--max-steps N] [--max-cache N] [--max-cache-mib N]\n\
    Checks a lockstep key-value history (one JSON op per line; `-` reads stdin).\n\
    Exit status: 0 linearizable, 1 not linearizable, 2 inconclusive or error.";

fn main() -> ExitCode {
    let mut file = None;
    let mut limits = CheckLimits::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "--max-steps" | "--max-cache" | "--max-cache-mib" => {
                let Some(n) = args.next().and_then(|v| v.parse::<u64>().ok()) else {
                    eprintln!("{a} needs a number\n{USAGE}");
                    return ExitCode::from(2);
                };
                let size = usize::try_from(n).unwrap_or(usize::MAX);
                match a.as_str() {
                    "--max-steps" => limits.max_steps = n,
                    "--max-cache" => limits.max_cache_entries = size,
                    _ => limits.max_cache_bytes = size.saturating_mul(1 << 20),
                }
            }
            _ if file.is_none() => file = Some(a),
            _ => {
                eprintln!("unexpected argument {a:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(file) = file else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let parsed = if file == "-" {
        parse_history(std::io::stdin().lock())
    } else {
        match std::fs::File::open(&file) {
            Ok(f) => parse_history(BufReader::new(f)),
            Err(e) => {
                eprintln!("lockstep-check: {file}: {e}");
                return ExitCode::from(2);
            }
        }
    };
    let history = match parsed {
        Ok(h) => h,
        Err(e) => {
            eprintln!("lockstep-check: {file}: {e}");
            return ExitCode::from(2);
        }
    };
    let result = check_kv(&history, limits);
    println!("{result}");
    match result {
        CheckResult::Linearizable { .. } => ExitCode::SUCCESS,
        CheckResult::NotLinearizable { .. } => ExitCode::from(1),
        CheckResult::Inconclusive { .. } => ExitCode::from(2),
    }
}
