//! The `ouro-quant` command line: parses the arguments and hands each command to its module under
//! `cli/` (its options and the call into the library). Errors print once here, with exit status 2.

mod cli;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use cli::{Cli, Command};

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    ouro_quant::output::install_signal_cleanup();
    let result = cli::convert::check_format_options(&matches).and_then(|()| {
        cli.command.register_inputs();
        match cli.command {
            Command::Inspect(a) => cli::inspect::run(a),
            Command::Convert(a) => cli::convert::run(a),
            Command::Synth(a) => cli::synth::run(a),
            Command::Run(a) => cli::run::run(a),
            Command::Validate(a) => cli::validate::run(a),
            Command::Batch(a) => cli::batch::run(a),
            Command::Plan(a) => cli::plan::run(a),
            Command::Perplexity(a) => cli::perplexity::run(a),
            Command::Logits(a) => cli::logits::run(a),
            Command::Imatrix(a) => cli::imatrix::run(a),
        }
    });
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::from(2)
    })
}
