//! `sotto demo`: the whole flow on this machine, in a temporary directory.
pub async fn run() -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
