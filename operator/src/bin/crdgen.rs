//! Prints the CustomResourceDefinition of `ReplicatedStateMachine` as YAML.
//!
//! `cargo run -p lockstep-operator --bin crdgen > crds/replicatedstatemachines.lockstep.dev.yaml`
//! `cargo run -p lockstep-operator --bin crdgen -- --helm > charts/lockstep/templates/crds/replicatedstatemachines.lockstep.dev.yaml`

fn main() -> anyhow::Result<()> {
    let helm = std::env::args().skip(1).any(|a| a == "--helm");
    let yaml = if helm {
        lockstep_operator::crd::crd_helm_yaml()?
    } else {
        lockstep_operator::crd::crd_yaml()?
    };
    print!("{yaml}");
    Ok(())
}
