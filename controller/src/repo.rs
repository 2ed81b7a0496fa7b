//! The policy repository, read through the `git` command: a clone or a bare repository.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use bulkhead_wire::pb;

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("git {args} in {repo}: {msg}")]
    Git {
        repo: PathBuf,
        args: String,
        msg: String,
    },
}

pub struct Repo {
    pub path: PathBuf,
    /// What to follow: a branch or `HEAD`.
    pub rev: String,
}

impl Repo {
    pub fn new(path: &Path, rev: &str) -> Self {
        Self {
            path: path.to_path_buf(),
            rev: rev.to_string(),
        }
    }

    fn git(&self, args: &[&str]) -> Result<Vec<u8>, RepoError> {
        let err = |msg: String| RepoError::Git {
            repo: self.path.clone(),
            args: args.join(" "),
            msg,
        };
        let out = Command::new("git")
            .arg("-C")
            .arg(&self.path)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| err(e.to_string()))?;
        if !out.status.success() {
            return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
        }
        Ok(out.stdout)
    }

    /// The commit `rev` points at now.
    pub fn head(&self) -> Result<String, RepoError> {
        let spec = format!("{}^{{commit}}", self.rev);
        let out = self.git(&["rev-parse", "--verify", "--quiet", &spec])?;
        Ok(String::from_utf8_lossy(&out).trim().to_string())
    }

    /// Author, committer, time and subject of a commit.
    pub fn revision(&self, commit: &str) -> Result<pb::Revision, RepoError> {
        let out = self.git(&[
            "show",
            "-s",
            "--format=%H%x00%an <%ae>%x00%cn <%ce>%x00%ct%x00%s",
            commit,
        ])?;
        let text = String::from_utf8_lossy(&out);
        let f: Vec<&str> = text.trim_end().splitn(5, '\0').collect();
        let field = |i: usize| f.get(i).copied().unwrap_or("").to_string();
        Ok(pb::Revision {
            commit: field(0),
            author: field(1),
            committer: field(2),
            commit_time_unix: field(3).parse().unwrap_or(0),
            summary: field(4),
        })
    }

    /// Write the commit's tree into `dir` (which must exist and be empty).
    pub fn export(&self, commit: &str, dir: &Path) -> Result<(), RepoError> {
        let err = |msg: String| RepoError::Git {
            repo: self.path.clone(),
            args: format!("archive {commit}"),
            msg,
        };
        let mut archive = Command::new("git")
            .arg("-C")
            .arg(&self.path)
            .args(["archive", "--format=tar", commit])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| err(e.to_string()))?;
        let stdout = archive
            .stdout
            .take()
            .ok_or_else(|| err("no stdout".into()))?;
        let tar = Command::new("tar")
            .arg("-x")
            .arg("-C")
            .arg(dir)
            .stdin(stdout)
            .output()
            .map_err(|e| err(e.to_string()))?;
        let git = archive.wait_with_output().map_err(|e| err(e.to_string()))?;
        if !git.status.success() {
            return Err(err(String::from_utf8_lossy(&git.stderr).trim().to_string()));
        }
        if !tar.status.success() {
            return Err(err(String::from_utf8_lossy(&tar.stderr).trim().to_string()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git(dir: &Path, args: &[&str]) {
        let ok = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .env("GIT_AUTHOR_NAME", "Alice")
            .env("GIT_AUTHOR_EMAIL", "alice@example.org")
            .env("GIT_COMMITTER_NAME", "Bob")
            .env("GIT_COMMITTER_EMAIL", "bob@example.org")
            .status()
            .unwrap()
            .success();
        assert!(ok, "git {args:?}");
    }

    #[test]
    fn reads_commits_and_exports_trees_from_a_real_repository() {
        let tmp = tempfile::tempdir().unwrap();
        let work = tmp.path().join("work");
        std::fs::create_dir_all(work.join("policies")).unwrap();
        git(&work, &["init", "-q", "-b", "main"]);
        std::fs::write(work.join("policies/a.yaml"), "a: 1\n").unwrap();
        git(&work, &["add", "."]);
        git(&work, &["commit", "-q", "-m", "first policy"]);
        let repo = Repo::new(&work, "main");
        let c1 = repo.head().unwrap();
        let rev = repo.revision(&c1).unwrap();
        assert_eq!(rev.commit, c1);
        assert_eq!(rev.author, "Alice <alice@example.org>");
        assert_eq!(rev.committer, "Bob <bob@example.org>");
        assert_eq!(rev.summary, "first policy");
        let out = tmp.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        repo.export(&c1, &out).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("policies/a.yaml")).unwrap(),
            "a: 1\n"
        );
        // A bare clone works the same.
        let bare = tmp.path().join("bare.git");
        git(
            tmp.path(),
            &["clone", "-q", "--bare", work.to_str().unwrap(), "bare.git"],
        );
        assert_eq!(Repo::new(&bare, "main").head().unwrap(), c1);
        assert!(Repo::new(&work, "nope").head().is_err());
    }
}
