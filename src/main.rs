//! The `sotto` binary: parse the command line, set up logging, run, map errors to
//! exit codes. Everything else lives in the library and in `cli/`.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Everything sotto creates (history database, logs, sockets, keys, certificates) is
    // the user's alone from the moment it exists, whatever the library asks for.
    // SAFETY: umask has no preconditions and cannot fail.
    unsafe { libc::umask(0o077) };
    // No core dumps of a process that may hold a decrypted identity, and no `ptrace` or
    // /proc/PID/mem reading by the user's other processes (as ssh-agent does).
    // SAFETY: PR_SET_DUMPABLE takes one integer argument and only changes this process.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0);
    }
    let args = cli::Args::parse();
    cli::init_logging(args.verbose, args.quiet, cli::log_file(&args));
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sotto: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that stopped reading (`sotto man | head`) is not a failure.
        Err(e) if e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)) => {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sotto: {e:#}");
            ExitCode::from(cli::exit::code_for(&e))
        }
    }
}
