//! `miren sandbox ...`.

use std::io::Write;

use anyhow::{anyhow, Result};
use http_body_util::BodyExt;
use hyper::Method;

use crate::cli::client::Client;
use crate::cli::SandboxCommand;
use crate::model::{ExecRequest, ExecResult, RunSandbox, Sandbox};

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
        (
            "exit code",
            s.exit_code.map_or("-".into(), |c| c.to_string()),
        ),
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
        println!("{:<11} {value}", format!("{key}:"));
    }
    if let Some(e) = &s.error {
        println!("{:<11} {e}", "error:");
    }
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
            let sandbox: Sandbox = client
                .call(Method::POST, "/v1/sandboxes", Some(&req))
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&sandbox)?);
            } else {
                println!("{}", sandbox.id);
            }
            Ok(0)
        }
        SandboxCommand::List { json } => {
            let sandboxes: Vec<Sandbox> = client.get("/v1/sandboxes").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&sandboxes)?);
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
                    s.exit_code.map_or("-".into(), |c| c.to_string()),
                    s.ip.clone().unwrap_or_else(|| "-".into()),
                    s.image
                );
            }
            Ok(0)
        }
        SandboxCommand::Status { sandbox, json } => {
            let s: Sandbox = client
                .get(&format!(
                    "/v1/sandboxes/{}",
                    crate::util::percent_encode(&sandbox)
                ))
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_sandbox(&s);
            }
            Ok(0)
        }
        SandboxCommand::Logs { sandbox, follow } => {
            let path = format!(
                "/v1/sandboxes/{}/logs?follow={follow}",
                crate::util::percent_encode(&sandbox)
            );
            let response = client
                .send(
                    Method::GET,
                    &path,
                    "application/json",
                    http_body_util::Empty::<hyper::body::Bytes>::new(),
                )
                .await?;
            let mut body = response.into_body();
            let mut out = std::io::stdout();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| anyhow!("the log stream broke off: {e}"))?;
                if let Ok(data) = frame.into_data() {
                    out.write_all(&data)?;
                    out.flush()?;
                }
            }
            Ok(0)
        }
        SandboxCommand::Exec { sandbox, cmd } => {
            let req = ExecRequest {
                args: cmd,
                env: Vec::new(),
            };
            let result: ExecResult = client
                .call(
                    Method::POST,
                    &format!(
                        "/v1/sandboxes/{}/exec",
                        crate::util::percent_encode(&sandbox)
                    ),
                    Some(&req),
                )
                .await?;
            print!("{}", result.stdout);
            eprint!("{}", result.stderr);
            Ok(result.exit_code)
        }
        SandboxCommand::Wait {
            sandbox,
            timeout,
            json,
        } => {
            let mut path = format!(
                "/v1/sandboxes/{}/wait",
                crate::util::percent_encode(&sandbox)
            );
            if let Some(timeout) = timeout {
                path.push_str(&format!("?timeout_secs={}", timeout.as_secs_f64()));
            }
            let s: Sandbox = client.call(Method::POST, &path, None::<&()>).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("{}", s.exit_code.map_or("-".into(), |c| c.to_string()));
            }
            Ok(0)
        }
        SandboxCommand::Stop { sandbox, grace } => {
            let mut path = format!(
                "/v1/sandboxes/{}/stop",
                crate::util::percent_encode(&sandbox)
            );
            if let Some(grace) = grace {
                path.push_str(&format!("?grace_secs={}", grace.as_secs_f64()));
            }
            let s: Sandbox = client.call(Method::POST, &path, None::<&()>).await?;
            println!(
                "stopped {} (exit code {})",
                s.name,
                s.exit_code.map_or("-".into(), |c| c.to_string())
            );
            Ok(0)
        }
        SandboxCommand::Delete { sandbox } => {
            let _: () = client
                .call(
                    Method::DELETE,
                    &format!("/v1/sandboxes/{}", crate::util::percent_encode(&sandbox)),
                    None::<&()>,
                )
                .await?;
            println!("deleted {sandbox}");
            Ok(0)
        }
    }
}
