//! Small helpers over rtnetlink.

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};

use crate::{Error, Result};

pub const ENODEV: i32 = libc::ENODEV;
pub const EEXIST: i32 = libc::EEXIST;

/// Opens a netlink connection in the calling thread's network namespace.
pub fn connect() -> Result<rtnetlink::Handle> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(|e| Error::Io {
        context: "opening a netlink socket".into(),
        source: e,
    })?;
    tokio::spawn(connection);
    Ok(handle)
}

/// The positive errno carried by a netlink error, if any.
pub fn errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

pub fn netlink_error(context: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let context = context.into();
    move |source| Error::Netlink { context, source }
}

pub async fn get_by_name(handle: &rtnetlink::Handle, name: &str) -> Result<Option<LinkMessage>> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(netlink_error(format!("looking up {name}"))(e)),
    }
}

pub async fn all_links(handle: &rtnetlink::Handle) -> Result<Vec<LinkMessage>> {
    handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink_error("listing links"))
}

pub async fn delete_index(handle: &rtnetlink::Handle, index: u32, what: &str) -> Result<()> {
    match handle.link().del(index).execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(()),
        Err(e) => Err(netlink_error(format!("deleting {what}"))(e)),
    }
}

pub async fn delete_by_name(handle: &rtnetlink::Handle, name: &str) -> Result<()> {
    match get_by_name(handle, name).await? {
        Some(link) => delete_index(handle, link.header.index, name).await,
        None => Ok(()),
    }
}

pub fn name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

pub fn alias(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfAlias(n) => Some(n.as_str()),
        _ => None,
    })
}

/// For a veth, the peer's ifindex (in the peer's namespace).
pub fn peer_index(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Link(i) => Some(*i),
        _ => None,
    })
}

pub fn is_up(link: &LinkMessage) -> bool {
    link.header.flags.contains(LinkFlags::Up)
}

/// The link's controller (a bridge port's bridge), if any.
pub fn controller(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(i) => Some(*i),
        _ => None,
    })
}

/// The link's hardware address.
pub fn mac(link: &LinkMessage) -> Option<&[u8]> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(mac) => Some(mac.as_slice()),
        _ => None,
    })
}

/// Whether IPv6 is off on the link (`disable_ipv6`, from its IPv6 device configuration);
/// None when the message carries none (a kernel without IPv6).
pub fn ipv6_disabled(link: &LinkMessage) -> Option<bool> {
    use rtnetlink::packet_route::link::{AfSpecInet6, AfSpecUnspec};
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::AfSpecUnspec(specs) => specs.iter().find_map(|spec| match spec {
            AfSpecUnspec::Inet6(inet6) => inet6.iter().find_map(|attribute| match attribute {
                AfSpecInet6::DevConf(conf) => Some(conf.disable_ipv6 != 0),
                _ => None,
            }),
            _ => None,
        }),
        _ => None,
    })
}
