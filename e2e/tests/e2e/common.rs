//! Set-up shared by every test: the cluster, the images, the operator installed once.

use std::sync::OnceLock;

use kube::Client;
use lockstep_e2e::{Images, install_operator};

static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();

/// The cluster client and the images under test, with the operator installed from the
/// plain manifests (once per run).
pub async fn setup() -> (Client, Images) {
    let client = lockstep_e2e::client().await;
    let images = Images::from_env();
    let installed = INSTALLED.get_or_init(|| install_operator(&images).map_err(|e| format!("{e:#}")));
    if let Err(e) = installed {
        panic!("installing the operator failed: {e}");
    }
    (client, images)
}
