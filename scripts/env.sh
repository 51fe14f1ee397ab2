# Sourced by scripts/test.sh (and usable by hand: `source scripts/env.sh`): makes the build and
# test prerequisites of the control plane available, quietly and only when missing.
#
# - protoc: loractl-proto uses the protoc of the `protoc-bin-vendored` crate, but etcd-client's
#   build script needs one as well and only looks at PROTOC or PATH. Without a system protoc,
#   PROTOC is pointed at the vendored one (no apt needed).
# - etcd: the etcd store tests start a real `etcd` on loopback. Installed with apt when missing
#   and running as root; LORACTL_SKIP_ETCD=1 skips those tests instead.
# - prometheus (and promtool): the dashboard test scrapes a real cluster with a real
#   Prometheus, and CI checks deploy/prometheus with promtool. Installed with apt the same way;
#   LORACTL_SKIP_PROMETHEUS=1 skips that test instead.

if [ -z "${PROTOC:-}" ] && ! command -v protoc >/dev/null 2>&1; then
  case "$(uname -m)" in
    x86_64) protoc_crate=protoc-bin-vendored-linux-x86_64 ;;
    aarch64) protoc_crate=protoc-bin-vendored-linux-aarch_64 ;;
    *) protoc_crate="" ;;
  esac
  if [ -n "$protoc_crate" ]; then
    # CI checks the committed Cargo.lock; a developer's may be ahead of it.
    locked=""
    if [ -n "${CI:-}" ]; then locked="--locked"; fi
    cargo fetch $locked --quiet
    manifest=$(cargo metadata $locked --format-version 1 2>/dev/null |
      grep -o "\"manifest_path\":\"[^\"]*/${protoc_crate}-[^\"]*/Cargo.toml\"" | head -n 1 |
      sed 's/^"manifest_path":"//; s/"$//' || true)
    if [ -n "$manifest" ] && [ -x "$(dirname "$manifest")/bin/protoc" ]; then
      export PROTOC="$(dirname "$manifest")/bin/protoc"
    fi
  fi
  if [ -z "${PROTOC:-}" ]; then
    echo "no protoc found: install it with \`apt-get install -y protobuf-compiler libprotobuf-dev\` or set PROTOC" >&2
  fi
fi

# LORACTL_ETCD names another etcd binary; then nothing is installed.
if [ "${LORACTL_SKIP_ETCD:-0}" != "1" ] && [ -z "${LORACTL_ETCD:-}" ] && ! command -v etcd >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing etcd-server for the etcd store tests" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt_log=$(mktemp)
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends etcd-server; } >"$apt_log" 2>&1; then
      cat "$apt_log" >&2
      echo "installing etcd-server failed; set LORACTL_SKIP_ETCD=1 to run without the etcd tests" >&2
    fi
    rm -f "$apt_log"
  else
    echo "etcd is missing: install it (\`apt-get install -y etcd-server\`) or set LORACTL_SKIP_ETCD=1" >&2
  fi
fi

# LORACTL_PROMETHEUS names another prometheus binary; then nothing is installed.
if [ "${LORACTL_SKIP_PROMETHEUS:-0}" != "1" ] && [ -z "${LORACTL_PROMETHEUS:-}" ] && ! command -v prometheus >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing prometheus for the dashboard test" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt_log=$(mktemp)
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; } >"$apt_log" 2>&1; then
      cat "$apt_log" >&2
      echo "installing prometheus failed; set LORACTL_SKIP_PROMETHEUS=1 to run without the dashboard test" >&2
    fi
    rm -f "$apt_log"
  else
    echo "prometheus is missing: install it (\`apt-get install -y prometheus\`) or set LORACTL_SKIP_PROMETHEUS=1" >&2
  fi
fi
