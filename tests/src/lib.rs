//! A fake miren agent for the CLI's contract tests: an HTTP server on a Unix socket in a temp
//! dir that answers canned JSON per route and records every request it gets, and a runner for
//! the real CLI pointed at it. No root, no kernel objects.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query as sent, e.g. `/v1/apps/shop/env?reveal=false`.
    pub target: String,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }
}

#[derive(Clone)]
struct Canned {
    status: StatusCode,
    content_type: &'static str,
    body: Vec<u8>,
}

#[derive(Default)]
struct Shared {
    answers: HashMap<(String, String), Canned>,
    requests: Vec<Recorded>,
}

/// The fake agent; stops (and removes its socket's directory) on drop.
pub struct FakeAgent {
    binary: PathBuf,
    dir: tempfile::TempDir,
    shared: Arc<Mutex<Shared>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeAgent {
    /// Starts a fake agent; `binary` is the CLI that [`FakeAgent::miren`] runs.
    pub fn start(binary: PathBuf) -> FakeAgent {
        let dir = tempfile::tempdir().expect("a temp dir");
        let socket = dir.path().join("agent.sock");
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let state = shared.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let listener = tokio::net::UnixListener::bind(&socket).expect("bind the socket");
                let _ = ready_tx.send(());
                let app = axum::Router::new().fallback(move |request: Request<Body>| {
                    let state = state.clone();
                    async move { answer(state, request).await }
                });
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        ready_rx.recv().expect("the fake agent started");
        FakeAgent {
            binary,
            dir,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    /// Answers `method path` (no query) with `status` and `body` as JSON.
    pub fn on<T: Serialize>(&self, method: &str, path: &str, status: u16, body: &T) {
        let body = serde_json::to_vec(body).expect("serializable");
        self.on_raw(method, path, status, "application/json", body);
    }

    /// Answers with the API's error shape.
    pub fn fail(&self, method: &str, path: &str, status: u16, code: &str, message: &str) {
        let body = miren_agent::model::ErrorBody {
            code: code.into(),
            message: message.into(),
        };
        self.on(method, path, status, &body);
    }

    pub fn on_raw(
        &self,
        method: &str,
        path: &str,
        status: u16,
        content_type: &'static str,
        body: Vec<u8>,
    ) {
        let canned = Canned {
            status: StatusCode::from_u16(status).expect("a status"),
            content_type,
            body,
        };
        self.lock()
            .answers
            .insert((method.to_string(), path.to_string()), canned);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// Runs the CLI against this agent.
    pub fn miren(&self, args: &[&str]) -> Run {
        self.miren_with_stdin(args, &[])
    }

    pub fn miren_with_stdin(&self, args: &[&str], stdin: &[u8]) -> Run {
        run_cli(&self.binary, &self.socket(), args, stdin)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn answer(shared: Arc<Mutex<Shared>>, request: Request<Body>) -> Response {
    let method = request.method().to_string();
    let target = request
        .uri()
        .path_and_query()
        .map_or_else(|| request.uri().path().to_string(), |p| p.to_string());
    let path = request.uri().path().to_string();
    let body: Bytes = axum::body::to_bytes(request.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    let mut shared = shared.lock().unwrap_or_else(|p| p.into_inner());
    shared.requests.push(Recorded {
        method: method.clone(),
        target,
        body: body.to_vec(),
    });
    match shared.answers.get(&(method.clone(), path.clone())) {
        Some(canned) => (
            canned.status,
            [("content-type", canned.content_type)],
            canned.body.clone(),
        )
            .into_response(),
        None => {
            let body = miren_agent::model::ErrorBody {
                code: "not_found".into(),
                message: format!("the fake agent has no answer for {method} {path}"),
            };
            (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
        }
    }
}

/// What a CLI run printed and how it exited.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "the CLI failed: {self:?}");
        &self.stdout
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.ok()).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

/// The CLI binary: `MIREN_CONTRACT_CLI` when set (to check another build against the same
/// contracts), else `built`, the one built with the tests (`CARGO_BIN_EXE_*` is only known
/// to the test targets).
pub fn cli_binary(built: &str) -> PathBuf {
    std::env::var_os("MIREN_CONTRACT_CLI")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(built))
}

pub fn run_cli(binary: &Path, socket: &Path, args: &[&str], stdin: &[u8]) -> Run {
    use std::io::Write;
    let mut child = Command::new(binary)
        .args(args)
        .env("MIREN_SOCKET", socket)
        .env_remove("MIREN_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the CLI");
    if let Some(mut input) = child.stdin.take() {
        let _ = input.write_all(stdin);
    }
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().expect("the CLI ran");
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// The operations of `docs/openapi.json`: (METHOD, path template).
pub fn openapi_operations() -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
    let text = std::fs::read_to_string(&path).expect("docs/openapi.json");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("OpenAPI JSON");
    let mut operations = Vec::new();
    for (template, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("a path item").keys() {
            operations.push((method.to_uppercase(), template.clone()));
        }
    }
    operations
}

/// Does a concrete path (`/v1/disks/d1`) fit a template (`/v1/disks/{disk}`)?
pub fn path_fits(template: &str, path: &str) -> bool {
    let want: Vec<&str> = template.split('/').collect();
    let got: Vec<&str> = path.split('/').collect();
    want.len() == got.len()
        && want
            .iter()
            .zip(&got)
            .all(|(w, g)| (w.starts_with('{') && w.ends_with('}') && !g.is_empty()) || w == g)
}

/// Every request the CLI made is an operation of the OpenAPI document. A literal segment wins
/// over a parameter (`/v1/disks/restore` is not `/v1/disks/{disk}`), as in the router.
pub fn assert_requests_in_openapi(requests: &[Recorded]) {
    let operations = openapi_operations();
    for request in requests {
        let path = request.path();
        let literal = operations.iter().any(|(_, t)| t == path);
        let fits = operations.iter().any(|(m, t)| {
            *m == request.method
                && if literal {
                    t == path
                } else {
                    path_fits(t, path)
                }
        });
        assert!(
            fits,
            "the CLI called {} {}, which docs/openapi.json does not have",
            request.method, request.target
        );
    }
}
