//! Manual poking: `netctl PREFIX SUBNET RUNTIME_DIR (ensure | add OWNER APP IP [ALLOW_APP..] | rules OWNER:APP:IP.. | del OWNER | list | uninstall)`.

use miren_netns::*;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        return Err("usage: netctl PREFIX SUBNET RUNTIME_DIR COMMAND ...".into());
    }
    let cfg = NetConfig::new(&args[0], args[1].parse()?, &args[2])?;
    let rest = &args[4..];
    let arg = |i: usize| -> Result<&str, String> {
        rest.get(i)
            .map(String::as_str)
            .ok_or_else(|| format!("missing argument {}", i + 1))
    };
    match args[3].as_str() {
        "ensure" => ensure_bridge_and_table(&cfg).await?,
        "add" => {
            let mut spec = EndpointSpec::new(arg(0)?, arg(1)?, arg(2)?.parse()?);
            spec.allow_from = rest.iter().skip(3).cloned().collect();
            println!("{:?}", create_endpoint(&cfg, &spec).await?);
        }
        "rules" => {
            let mut specs = Vec::new();
            for item in rest {
                let parts: Vec<&str> = item.split(':').collect();
                let [owner, app, ip, allow_from @ ..] = parts.as_slice() else {
                    return Err(format!("expected OWNER:APP:IP[:ALLOWED_APP..], got {item}").into());
                };
                let mut spec = EndpointSpec::new(*owner, *app, ip.parse()?);
                spec.allow_from = allow_from.iter().map(|s| s.to_string()).collect();
                specs.push(spec);
            }
            apply_rules(&cfg, &specs).await?;
        }
        "del" => delete_endpoint(&cfg, arg(0)?).await?,
        "list" => println!("{:#?}", list_kernel_objects(&cfg).await?),
        "uninstall" => uninstall(&cfg).await?,
        other => return Err(format!("unknown command {other}").into()),
    }
    Ok(())
}
