//! `miren env ...`: the environment an app's services get.

use anyhow::Result;
use clap::Subcommand;

use crate::cli::client::Client;
use crate::cli::output::{print_json, print_table};

#[derive(Subcommand, Debug)]
pub enum EnvCommand {
    /// Variables the app's services get (secrets masked unless --reveal).
    List {
        #[arg(short = 'a', long)]
        app: String,
        #[arg(long)]
        reveal: bool,
        /// An object of names to values.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(client: &Client, command: EnvCommand) -> Result<i32> {
    let EnvCommand::List { app, reveal, json } = command;
    let vars = client.app_env(&app, reveal).await?;
    if json {
        let object: serde_json::Map<String, serde_json::Value> = vars
            .into_iter()
            .map(|v| (v.name, serde_json::Value::String(v.value)))
            .collect();
        print_json(&object)?;
    } else if vars.is_empty() {
        println!("app `{app}` has no variables yet (addons inject theirs once active)");
    } else {
        let rows = vars
            .into_iter()
            .map(|v| {
                let sensitive = if v.sensitive { "yes" } else { "no" };
                vec![v.name, v.value, sensitive.into(), v.source]
            })
            .collect();
        print_table(&["NAME", "VALUE", "SENSITIVE", "SOURCE"], rows);
    }
    Ok(0)
}
