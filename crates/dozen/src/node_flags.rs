//! The node flags that need more than clap: labels, and the user tasks run as.

/// `KEY=VALUE` of `--label`.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not a label; write KEY=VALUE, e.g. disk=ssd"))?;
    if key.is_empty() {
        return Err(format!("`{s}` has no key; write KEY=VALUE, e.g. disk=ssd"));
    }
    Ok((key.to_string(), value.to_string()))
}

/// The user tasks run as when their service names none (see `--task-user`).
pub fn task_user(given: Option<&str>) -> anyhow::Result<Option<String>> {
    let user = match given {
        Some(user) => user.to_string(),
        // `nobody`, or its conventional numbers where no account names them (a minimal
        // container without /etc/passwd).
        None if dozen_agent::os::effective_uid() == 0 => {
            match dozen_agent::os::lookup_user("nobody") {
                Some(_) => "nobody".to_string(),
                None => "65534:65534".to_string(),
            }
        }
        None => return Ok(None),
    };
    if dozen_agent::os::lookup_user(&user).is_none() {
        anyhow::bail!(
            "the task user `{user}` does not exist on this host; create it, or name another \
             unprivileged user with --task-user (a name, uid or uid:gid; `root` runs tasks as root)"
        );
    }
    Ok(Some(user))
}
