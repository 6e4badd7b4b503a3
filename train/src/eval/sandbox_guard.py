# Runs before a model's program in the sandbox (eval/execution.rs). The kernel enforces the real
# limits (rlimits, no network namespace, an unprivileged user, a process cap); this guard only
# mirrors nanochat's execution.py, so a program that nanochat's guard breaks (calling os.chdir,
# subprocess.Popen, ...) fails here too and the two evaluators score alike.
import builtins, faulthandler, os, shutil, subprocess, sys

source = sys.stdin.read()
faulthandler.disable()
builtins.exit = None
builtins.quit = None
builtins.help = None
os.environ["OMP_NUM_THREADS"] = "1"
for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid",
             "fork", "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink",
             "fchmod", "fchown", "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown",
             "getcwd", "chdir"):
    setattr(os, name, None)
for name in ("rmtree", "move", "chown"):
    setattr(shutil, name, None)
subprocess.Popen = None
for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[name] = None
del builtins, faulthandler, os, shutil, subprocess
exec(compile(source, "<llm>", "exec"), {"__name__": "__main__"})
