//! `syncctl`: the `sync` primitives from the shell, on any backend named by a URL.
//!
//! Run a command under a distributed lock or while leader, read and write a shared map, submit
//! and work on tasks, read synchronized time. `syncctl --help` lists the commands and the exit
//! statuses; every command's `--help` has an example.

mod backend;
mod child;
mod cli;
mod exit;
mod hold;
mod leader;
mod lock;
mod map;
mod output;
mod task;
mod time;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use crate::{
    cli::{Cli, Command},
    exit::Exit,
};

fn main() -> ExitCode {
    quiet_panics();
    let cli = Cli::parse();
    // One thread: the kernel's "kill CMD when syncctl dies" follows the thread that spawned
    // CMD, so no CMD may be spawned from a worker thread that can exit.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let status = match runtime {
        Ok(runtime) => runtime.block_on(dispatch(cli)),
        Err(e) => Err(Exit::failed(format!("starting the runtime: {e}"))),
    };
    match status {
        Ok(status) => ExitCode::from(status),
        Err(exit) => {
            if !exit.message.is_empty() {
                output::err(&exit.message);
            }
            ExitCode::from(exit.status)
        }
    }
}

async fn dispatch(cli: Cli) -> Result<u8, Exit> {
    let global = &cli.global;
    match cli.command {
        Command::Lock(args) => lock::run(global, args).await,
        Command::Elect(args) => leader::elect(global, args).await,
        Command::Leader(args) => leader::leader(global, args).await,
        Command::Time(args) => time::run(global, args).await,
        Command::Map(command) => {
            backend::with_client(global, async |c| map::run(c, global, command).await).await
        }
        Command::Task(command) => {
            backend::with_client(global, async |c| task::run(c, global, command).await).await
        }
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "syncctl", &mut out);
            output::bytes(&out);
            Ok(0)
        }
    }
}

/// A bug must still end in one line and syncctl's failure status, not a backtrace.
fn quiet_panics() {
    std::panic::set_hook(Box::new(|info| {
        let place = info
            .location()
            .map_or(String::new(), |l| format!(" at {}:{}", l.file(), l.line()));
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        output::err(&exit::one_line(&format!("internal error{place}: {what}")));
        std::process::exit(i32::from(exit::FAILED));
    }));
}
