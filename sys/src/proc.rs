//! `/proc/PID/stat`: whether a process is alive, and its start time.

use std::fs;

/// Start time (clock ticks since boot, field 22 of `/proc/PID/stat`) of a live process.
///
/// A zombie (`Z`) or dead (`X`) process has exited: it holds no files, mounts or leases and
/// only waits for its parent to reap it, so it yields `None` just like a vanished pid. Every
/// "is the recorded process still there" check is built on this, so all agree on zombies.
pub fn start_time(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    parse_start_time(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// True if `pid` is alive and is the process that started at `start_time` (a reused pid is not).
pub fn is_same_process(pid: i32, start_time: u64) -> bool {
    self::start_time(pid) == Some(start_time)
}

/// Supplementary group ids of `pid` (the `Groups:` line of `/proc/PID/status`; SO_PEERCRED
/// carries only the primary group). `None` when the process or the line is gone.
pub fn supplementary_groups(pid: i32) -> Option<Vec<u32>> {
    if pid <= 0 {
        return None;
    }
    parse_groups(&fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// The `Groups:` line of a `/proc/PID/status` text; a token that is not a number is skipped.
pub fn parse_groups(status: &str) -> Option<Vec<u32>> {
    let groups = status.lines().find_map(|l| l.strip_prefix("Groups:"))?;
    Some(
        groups
            .split_whitespace()
            .filter_map(|g| g.parse().ok())
            .collect(),
    )
}

/// The state letter of `pid` (field 3 of `/proc/PID/stat`: `R`, `S`, `D`, `Z`...), for
/// saying why a process lingers; `None` when it is gone.
pub fn state(pid: i32) -> Option<char> {
    if pid <= 0 {
        return None;
    }
    parse_state(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The fields of a `/proc/PID/stat` line from field 3 (state) on.
fn fields_after_comm(stat: &str) -> Option<std::str::SplitWhitespace<'_>> {
    // comm (field 2) may contain spaces and parentheses: the fields resume after the last ')'.
    Some(stat.get(stat.rfind(')')? + 1..)?.split_whitespace())
}

/// Field 3 (the state letter) of a `/proc/PID/stat` line.
pub fn parse_state(stat: &str) -> Option<char> {
    fields_after_comm(stat)?.next()?.chars().next()
}

/// Field 22 of a `/proc/PID/stat` line, or `None` for a zombie, a dead process or a bad line.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let mut fields = fields_after_comm(stat)?;
    // The fields start at field 3 (state); the start time is field 22.
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    const LINE: &str =
        "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 50";

    #[test]
    fn the_state_is_the_field_after_the_command_name() {
        assert_eq!(parse_state(LINE), Some('S'));
        assert_eq!(parse_state("garbage"), None);
        assert!(state(std::process::id() as i32).is_some());
        assert_eq!(state(0), None);
    }

    #[test]
    fn parses_past_a_command_name_with_parentheses_and_spaces() {
        assert_eq!(parse_start_time(LINE), Some(987_654));
    }

    #[test]
    fn zombies_and_dead_processes_have_no_start_time() {
        assert_eq!(parse_start_time(&LINE.replace(" S ", " Z ")), None);
        assert_eq!(parse_start_time(&LINE.replace(" S ", " X ")), None);
        assert_eq!(parse_start_time(&LINE.replace(" S ", " D ")), Some(987_654));
    }

    #[test]
    fn bad_lines_are_none() {
        assert_eq!(parse_start_time(""), None);
        assert_eq!(parse_start_time("12 (x"), None);
        assert_eq!(parse_start_time("12 (x) S 1 2"), None);
    }

    #[test]
    fn groups_come_from_the_groups_line() {
        let status = "Name:\tx\nGid:\t5\t5\t5\t5\nGroups:\t4 24 1000 \nNSpid:\t1\n";
        assert_eq!(parse_groups(status), Some(vec![4, 24, 1000]));
        assert_eq!(parse_groups("Groups:\n"), Some(vec![]));
        assert_eq!(parse_groups("Name:\tx\n"), None);
    }

    #[test]
    fn own_groups_match_getgroups() {
        let me = std::process::id() as i32;
        let mut from_proc = supplementary_groups(me).expect("our own /proc status");
        let mut buf = vec![0 as libc::gid_t; 1024];
        // SAFETY: `buf` holds `buf.len()` gid_t slots and getgroups writes at most that many.
        let n = unsafe { libc::getgroups(buf.len() as libc::c_int, buf.as_mut_ptr()) };
        assert!(n >= 0, "getgroups failed");
        buf.truncate(n as usize);
        buf.sort_unstable();
        buf.dedup();
        from_proc.sort_unstable();
        from_proc.dedup();
        assert_eq!(from_proc, buf);
        assert_eq!(supplementary_groups(0), None);
    }

    #[test]
    fn own_process_is_alive_and_a_wrong_start_time_is_not() {
        let me = std::process::id() as i32;
        let Some(start) = start_time(me) else {
            panic!("no start time for our own pid {me}")
        };
        assert!(is_same_process(me, start));
        assert!(!is_same_process(me, start + 1));
        assert_eq!(start_time(0), None);
        assert_eq!(start_time(-1), None);
    }

    #[test]
    fn an_unreaped_child_is_a_zombie_and_not_alive() {
        let mut child = Command::new("true")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawning true");
        let pid = child.id() as i32;
        // Until we reap it, the exited child stays in /proc as a zombie.
        let stat_path = format!("/proc/{pid}/stat");
        let mut became_zombie = false;
        for _ in 0..2000 {
            let stat = fs::read_to_string(&stat_path).expect("unreaped child has a stat file");
            let state = stat[stat.rfind(')').expect("comm") + 2..].split(' ').next();
            if state == Some("Z") {
                became_zombie = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(became_zombie, "child never exited");
        assert_eq!(start_time(pid), None);
        child.wait().expect("reaping");
    }
}
