// runc-wrapper: an OCI runtime that drops CAP_SYS_RESOURCE from every process
// spec, then runs the real runc with the same arguments.
//
// Why: on machines whose capability bounding set lacks CAP_SYS_RESOURCE (some
// VMs and sandboxes), `docker run --privileged` — which kind uses for its
// nodes — fails with "unable to apply caps: operation not permitted", because
// dockerd asks for every capability it knows. hack/kind/kind.py registers this
// wrapper as dockerd's default runtime only when /proc/self/status shows the
// capability missing from CapBnd (see ../shared/KIND-OFFLINE.md, blocker 1).
//
// It edits the bundle's config.json on `create`/`run` and the process file on
// `exec --process FILE`; every other call passes through untouched.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
)

const dropped = "CAP_SYS_RESOURCE"

// realRuntime is the runc this wrapper execs; set at build time with
// -ldflags "-X main.realRuntime=/path/to/runc" (default: Debian's).
var realRuntime = "/usr/sbin/runc"

func main() {
	args := os.Args[1:]
	if err := rewrite(args); err != nil {
		fmt.Fprintf(os.Stderr, "runc-wrapper: %v\n", err)
		os.Exit(1)
	}
	argv := append([]string{realRuntime}, args...)
	if err := syscall.Exec(realRuntime, argv, os.Environ()); err != nil {
		fmt.Fprintf(os.Stderr, "runc-wrapper: exec %s: %v\n", realRuntime, err)
		os.Exit(1)
	}
}

// rewrite finds the OCI command among runc's global flags and edits the spec it
// will read.
func rewrite(args []string) error {
	cmd, rest := command(args)
	switch cmd {
	case "create", "run":
		bundle := flagValue(rest, "--bundle", "-b")
		if bundle == "" {
			bundle = "."
		}
		return editFile(filepath.Join(bundle, "config.json"), func(spec map[string]any) {
			if p, ok := spec["process"].(map[string]any); ok {
				dropFromProcess(p)
			}
		})
	case "exec":
		if proc := flagValue(rest, "--process", "-p"); proc != "" {
			return editFile(proc, dropFromProcess)
		}
	}
	return nil
}

// command skips runc's global flags (all of which take a value except the
// boolean ones listed) and returns the subcommand and its arguments.
func command(args []string) (string, []string) {
	booleans := map[string]bool{"--debug": true, "--systemd-cgroup": true,
		"--help": true, "-h": true, "--version": true, "-v": true}
	for i := 0; i < len(args); i++ {
		a := args[i]
		if len(a) == 0 || a[0] != '-' {
			return a, args[i+1:]
		}
		if booleans[a] || containsEq(a) {
			continue
		}
		i++ // the value of a global flag (--root, --log, --log-format, --rootless, ...)
	}
	return "", nil
}

func containsEq(s string) bool {
	for _, c := range s {
		if c == '=' {
			return true
		}
	}
	return false
}

func flagValue(args []string, names ...string) string {
	for i, a := range args {
		for _, n := range names {
			if a == n && i+1 < len(args) {
				return args[i+1]
			}
			if len(a) > len(n)+1 && a[:len(n)+1] == n+"=" {
				return a[len(n)+1:]
			}
		}
	}
	return ""
}

func dropFromProcess(p map[string]any) {
	caps, ok := p["capabilities"].(map[string]any)
	if !ok {
		return
	}
	for set, v := range caps {
		list, ok := v.([]any)
		if !ok {
			continue
		}
		kept := list[:0]
		for _, c := range list {
			if c != dropped {
				kept = append(kept, c)
			}
		}
		caps[set] = kept
	}
}

func editFile(path string, edit func(map[string]any)) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var doc map[string]any
	if err := json.Unmarshal(data, &doc); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	edit(doc)
	out, err := json.Marshal(doc)
	if err != nil {
		return err
	}
	info, err := os.Stat(path)
	if err != nil {
		return err
	}
	return os.WriteFile(path, out, info.Mode().Perm())
}
