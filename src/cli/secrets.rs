//! Reading passphrases and passwords: files or stdin for scripts, no-echo prompts for
//! people, never command-line arguments.

use std::io::{BufRead, IsTerminal};
use std::path::Path;

use anyhow::{bail, Context, Result};
use zeroize::Zeroizing;

use super::exit::UsageError;

/// Reads a secret from a file: its first line, without the line ending.
pub fn from_file(path: &Path) -> Result<Zeroizing<String>> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.len() > 64 * 1024 {
        bail!(UsageError(format!("{} is too large for a secret file", path.display())));
    }
    let raw = Zeroizing::new(std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?);
    Ok(Zeroizing::new(raw.lines().next().unwrap_or("").to_string()))
}

pub fn from_stdin() -> Result<Zeroizing<String>> {
    // Room for any password up front: a buffer that grew would leave copies behind.
    let mut line = Zeroizing::new(String::with_capacity(4096));
    std::io::stdin().lock().read_line(&mut line).context("cannot read standard input")?;
    Ok(Zeroizing::new(line.trim_end_matches(['\r', '\n']).to_string()))
}

fn prompt(text: &str) -> Result<Zeroizing<String>> {
    if !std::io::stdin().is_terminal() {
        bail!(UsageError(format!(
            "{} needed but there is no terminal to ask on: use the file option (see --help)",
            text.trim_end_matches(": ")
        )));
    }
    Ok(Zeroizing::new(rpassword::prompt_password(text).context("cannot read from the terminal")?))
}

/// Asks twice and insists on a match.
fn prompt_new(text: &str) -> Result<Zeroizing<String>> {
    let first = prompt(text)?;
    let again = prompt("Repeat: ")?;
    if *first != *again {
        bail!(UsageError("the two entries differ".into()));
    }
    Ok(first)
}

/// Where a secret comes from.
pub struct Source<'a> {
    pub file: Option<&'a Path>,
    pub stdin: bool,
    pub what: &'a str,
}

impl Source<'_> {
    pub fn read(&self, new: bool) -> Result<Zeroizing<String>> {
        let secret = match (self.file, self.stdin) {
            (Some(path), _) => from_file(path)?,
            (None, true) => from_stdin()?,
            (None, false) if new => prompt_new(&format!("New {}: ", self.what))?,
            (None, false) => prompt(&format!("{}: ", capitalise(self.what)))?,
        };
        if secret.is_empty() {
            bail!(UsageError(format!("the {} is empty", self.what)));
        }
        Ok(secret)
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
}
