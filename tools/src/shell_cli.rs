//! `sf completions` and `sf man`: shell completion scripts and man pages,
//! generated from the CLI's own definition so they cannot drift from it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory};
use clap_complete::Shell;
use clap_mangen::Man;

use crate::Cli;

/// The name the scripts complete and the man pages document.
const BIN_NAME: &str = "sf";

#[derive(Debug, Args)]
pub(crate) struct CompletionsArgs {
    /// Shell to write the completion script for.
    shell: Shell,
}

#[derive(Debug, Args)]
pub(crate) struct ManArgs {
    /// Write `sf.1` and one page per subcommand (`sf-cluster-up.1`, ...) into
    /// this directory, creating it, instead of printing `sf.1` on stdout.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

pub(crate) fn completions(args: &CompletionsArgs) -> Result<ExitCode> {
    // Generated into memory first: the generator panics on a write error,
    // such as a reader that closed the pipe early.
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut Cli::command(), BIN_NAME, &mut script);
    std::io::stdout()
        .write_all(&script)
        .context("writing the completion script")?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn man(args: &ManArgs) -> Result<ExitCode> {
    let Some(dir) = &args.out else {
        page(documented_cli())
            .render(&mut std::io::stdout().lock())
            .context("writing the man page")?;
        return Ok(ExitCode::SUCCESS);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // clap_mangen's own `generate_to` does not return the paths it writes.
    for path in write_pages(documented_cli(), dir)? {
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// The CLI as its man pages describe it, without clap's `help` subcommand,
/// which gets no page (as in clap_mangen's `generate_to`).
fn documented_cli() -> clap::Command {
    let mut cli = Cli::command().disable_help_subcommand(true);
    // Names each subcommand after its path, `sf-cluster-up`: the page's name.
    cli.build();
    cli
}

/// Writes the page of `cmd` and of each of its visible subcommands, at
/// every depth, into `dir`; returns the files written.
fn write_pages(cmd: clap::Command, dir: &Path) -> Result<Vec<PathBuf>> {
    let subcommands: Vec<clap::Command> = cmd
        .get_subcommands()
        .filter(|sub| !sub.is_hide_set())
        .cloned()
        .collect();
    let page = page(cmd);
    let path = page
        .generate_to(dir)
        .with_context(|| format!("writing {}", dir.join(page.get_filename()).display()))?;
    let mut written = vec![path];
    for sub in subcommands {
        written.extend(write_pages(sub, dir)?);
    }
    Ok(written)
}

/// A section-1 page whose footer names `sf` and its version on every page,
/// subcommands included (they carry no version of their own).
fn page(cmd: clap::Command) -> Man {
    Man::new(cmd).source(format!("{BIN_NAME} {}", env!("CARGO_PKG_VERSION")))
}
