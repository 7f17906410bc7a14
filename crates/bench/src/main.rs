//! routing-bench: the load generator of routing-service.

use std::process::ExitCode;

use clap::Parser as _;
use routing_bench::Options;

#[tokio::main]
async fn main() -> ExitCode {
    let options = Options::parse();
    let report = match routing_bench::run(&options).await {
        Ok(report) => report,
        Err(err) => {
            eprintln!("routing-bench failed: {err:#}");
            return ExitCode::from(2);
        }
    };
    if options.json {
        match serde_json::to_string(&report) {
            Ok(json) => println!("{json}"),
            Err(err) => {
                eprintln!("routing-bench could not serialise the report: {err}");
                return ExitCode::from(2);
            }
        }
    } else {
        print!("{}", report.table());
    }
    if report.failed() {
        eprintln!("FAILED: the run broke a delivery guarantee (see the accounting above)");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
