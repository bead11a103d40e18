//! `miren sandbox ...`.

use std::io::Write;
use std::time::Duration;

use anyhow::{anyhow, Result};
use clap::Subcommand;

use crate::cli::client::Client;
use crate::cli::output::{print_field, print_json};
use crate::cli::parse::{parse_duration, parse_publish};
use crate::model::{ExecRequest, PublishPort, RunSandbox, Sandbox};

// Parsed once per process; boxing the big `run` arguments would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum SandboxCommand {
    /// Start a sandbox from an image and print its id.
    Run {
        #[arg(long)]
        image: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        app: Option<String>,
        /// KEY=VALUE (repeatable).
        #[arg(long)]
        env: Vec<String>,
        /// Memory limit, e.g. 256M (default 512M).
        #[arg(long)]
        memory: Option<String>,
        /// CPUs, e.g. 0.5 (default 1).
        #[arg(long)]
        cpus: Option<f64>,
        /// Maximum number of tasks (default 1024).
        #[arg(long)]
        pids: Option<i64>,
        /// Size of the writable layer, the container's own root filesystem writes (default 1G).
        #[arg(long)]
        writable_size: Option<String>,
        /// NAME:/path[:ro] (repeatable): a disk, leased for the sandbox's life.
        #[arg(long)]
        disk: Vec<String>,
        #[arg(long, value_parser = parse_duration)]
        lease_timeout: Option<Duration>,
        /// Mount the app's local storage directory here.
        #[arg(long)]
        local_dir: Option<String>,
        /// A private tmpfs: /path[:size] (repeatable; default size 64M).
        #[arg(long)]
        tmpfs: Vec<String>,
        #[arg(long, value_parser = ["no", "on-failure", "always"])]
        restart: Option<String>,
        /// Publish a TCP port on the host: HOSTPORT:PORT (127.0.0.1) or IP:HOSTPORT:PORT.
        #[arg(long, value_parser = parse_publish)]
        publish: Vec<PublishPort>,
        #[arg(long)]
        json: bool,
        /// Command and arguments (default: the image's entrypoint and cmd).
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// List sandboxes.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one sandbox.
    Status {
        sandbox: String,
        #[arg(long)]
        json: bool,
    },
    /// Print a sandbox's output.
    Logs {
        sandbox: String,
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Run a command inside a running sandbox.
    Exec {
        sandbox: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Wait until a sandbox is over (exited, no restart to come) and print its exit code.
    Wait {
        sandbox: String,
        /// Give up after this long (e.g. 30s, 5m); exits 1 then.
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
        #[arg(long)]
        json: bool,
    },
    /// Stop a sandbox: SIGTERM, a grace period, SIGKILL.
    Stop {
        sandbox: String,
        #[arg(long, value_parser = parse_duration)]
        grace: Option<Duration>,
    },
    /// Stop a sandbox and remove everything it had.
    Delete { sandbox: String },
}

fn print_sandbox(s: &Sandbox) {
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    for (key, value) in [
        ("id", s.id.clone()),
        ("name", s.name.clone()),
        ("app", s.app.clone()),
        ("image", s.image.clone()),
        ("state", s.state.to_string()),
        ("pid", s.pid.map_or("-".into(), |p| p.to_string())),
        ("ip", opt(&s.ip)),
        ("exit code", exit_code(s)),
        ("oom killed", s.oom_killed.to_string()),
        ("restarts", s.restarts.to_string()),
        ("started", opt(&s.started_at)),
        ("finished", opt(&s.finished_at)),
        (
            "disks",
            if s.disks.is_empty() {
                "-".into()
            } else {
                s.disks.join(",")
            },
        ),
    ] {
        print_field(key, &value);
    }
    if let Some(e) = &s.error {
        print_field("error", e);
    }
}

fn exit_code(s: &Sandbox) -> String {
    s.exit_code.map_or("-".into(), |c| c.to_string())
}

/// Returns the process exit code (exec passes the command's through).
pub async fn run(client: &Client, command: SandboxCommand) -> Result<i32> {
    match command {
        SandboxCommand::Run {
            image,
            name,
            app,
            env,
            memory,
            cpus,
            pids,
            writable_size,
            disk,
            lease_timeout,
            local_dir,
            tmpfs,
            restart,
            publish,
            json,
            cmd,
        } => {
            let req = RunSandbox {
                image,
                name,
                app,
                env,
                memory,
                cpus,
                pids,
                writable_size,
                disks: disk,
                lease_timeout_secs: lease_timeout.map(|d| d.as_secs_f64()),
                local_dir,
                tmpfs,
                restart,
                publish,
                allow_from: Vec::new(),
                cmd,
            };
            let sandbox = client.run_sandbox(&req).await?;
            if json {
                print_json(&sandbox)?;
            } else {
                println!("{}", sandbox.id);
            }
        }
        SandboxCommand::List { json } => {
            let sandboxes = client.sandboxes().await?;
            if json {
                print_json(&sandboxes)?;
                return Ok(0);
            }
            let (id, name, app, state, exit, ip, image) =
                ("ID", "NAME", "APP", "STATE", "EXIT", "IP", "IMAGE");
            println!("{id:<22} {name:<20} {app:<14} {state:<9} {exit:>5} {ip:<15} {image}");
            for s in sandboxes {
                println!(
                    "{:<22} {:<20} {:<14} {:<9} {:>5} {:<15} {}",
                    s.id,
                    s.name,
                    s.app,
                    s.state,
                    exit_code(&s),
                    s.ip.clone().unwrap_or_else(|| "-".into()),
                    s.image
                );
            }
        }
        SandboxCommand::Status { sandbox, json } => {
            let s = client.sandbox(&sandbox).await?;
            if json {
                print_json(&s)?;
            } else {
                print_sandbox(&s);
            }
        }
        SandboxCommand::Logs { sandbox, follow } => {
            let mut logs = client.sandbox_logs(&sandbox, follow).await?;
            let mut out = std::io::stdout();
            while let Some(chunk) = logs.chunk().await {
                let data = chunk.map_err(|e| anyhow!("the log stream broke off: {e}"))?;
                out.write_all(&data)?;
                out.flush()?;
            }
        }
        SandboxCommand::Exec { sandbox, cmd } => {
            let req = ExecRequest {
                args: cmd,
                env: Vec::new(),
            };
            let result = client.exec_sandbox(&sandbox, &req).await?;
            print!("{}", result.stdout);
            eprint!("{}", result.stderr);
            return Ok(result.exit_code);
        }
        SandboxCommand::Wait {
            sandbox,
            timeout,
            json,
        } => {
            let s = client
                .wait_sandbox(&sandbox, timeout.map(|t| t.as_secs_f64()))
                .await?;
            if json {
                print_json(&s)?;
            } else {
                println!("{}", exit_code(&s));
            }
        }
        SandboxCommand::Stop { sandbox, grace } => {
            let s = client
                .stop_sandbox(&sandbox, grace.map(|g| g.as_secs_f64()))
                .await?;
            println!("stopped {} (exit code {})", s.name, exit_code(&s));
        }
        SandboxCommand::Delete { sandbox } => {
            client.delete_sandbox(&sandbox).await?;
            println!("deleted {sandbox}");
        }
    }
    Ok(0)
}
