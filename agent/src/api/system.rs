//! The agent itself: who it is. (`/openapi.json` is served from the router in `mod.rs`.)

use axum::extract::State;
use axum::Json;

use super::AppState;
use crate::model::AgentInfo;

#[utoipa::path(get, path = "/v1/info", tag = "agent",
    responses((status = 200, description = "Who this agent is", body = AgentInfo)))]
pub(super) async fn agent_info(State(state): State<AppState>) -> Json<AgentInfo> {
    Json(AgentInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        data_dir: state.disks.cfg.data_dir.display().to_string(),
        name_prefix: state.disks.cfg.name_prefix.clone(),
        pid: std::process::id(),
    })
}
