#!/usr/bin/env bash
# Run an Apache Pulsar standalone broker (RocksDB metadata + in-process
# BookKeeper bookie) in the FOREGROUND, built only from Maven Central jars.
#
# Usage: run-standalone.sh DATA_DIR [BROKER_PORT WEB_PORT]
#        run-standalone.sh --resolve-classpath
#
#   --resolve-classpath  only resolve (or check) the cached classpath and print
#                        its file; what `alpes up --broker pulsar` runs first,
#                        with a time limit, before it starts the broker
#
#   DATA_DIR     state of this broker: metadata/, bookkeeper/, logs/, conf/
#                (created if missing; reuse it to restart with the same data)
#   BROKER_PORT  binary protocol port (default 6650)
#   WEB_PORT     admin REST / HTTP port (default 8080)
#
# Everything binds to 127.0.0.1 only. The process execs into the JVM, so the
# PID of this script is the PID of the broker; SIGTERM stops it cleanly.
#
# Environment (all optional):
#   PULSAR_BOOKIE_PORT           bookie port (default: a free port chosen by
#                                Pulsar on first start, then kept in the
#                                bookie cookie under DATA_DIR/bookkeeper)
#   PULSAR_STANDALONE_EXTRA_CONF file of key=value lines appended to the
#                                rendered conf (e.g. JWT auth settings)
#   PULSAR_MEM                   heap/direct memory flags
#                                (default: -Xms256m -Xmx512m -XX:MaxDirectMemorySize=256m)
#   PULSAR_EXTRA_OPTS            extra JVM flags
#   PULSAR_LOG_LEVEL             root log level (default info), log file:
#                                DATA_DIR/logs/pulsar-standalone.log
#   PULSAR_LOG_CONSOLE_LEVEL     console threshold (default warn)
#   PULSAR_CLASSPATH_FILE        classpath file to use/create (default:
#                                ${XDG_CACHE_HOME:-~/.cache}/alpespartner-pulsar/classpath-<pom sha>.txt)
#   PULSAR_MVN_LOG               where Maven's output goes (default: next to
#                                the classpath file); its tail is shown if it fails
#   JAVA_HOME, MVN               java / maven to use
set -euo pipefail

usage() { echo "usage: $0 DATA_DIR [BROKER_PORT WEB_PORT] | $0 --resolve-classpath" >&2; exit 2; }
[[ $# -eq 1 || $# -eq 3 ]] || usage

HERE="$(cd -P "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RESOLVE_ONLY=0
[[ "$1" == "--resolve-classpath" ]] && RESOLVE_ONLY=1
DATA_DIR="$1"
BROKER_PORT="${2:-6650}"
WEB_PORT="${3:-8080}"
for p in "$BROKER_PORT" "$WEB_PORT" ${PULSAR_BOOKIE_PORT:+"$PULSAR_BOOKIE_PORT"}; do
  [[ "$p" =~ ^[0-9]+$ ]] || { echo "not a port number: $p" >&2; exit 2; }
done

if [[ $RESOLVE_ONLY -eq 0 ]]; then
  mkdir -p "$DATA_DIR"
  DATA_DIR="$(cd -P "$DATA_DIR" && pwd)"
fi

# --- Java -------------------------------------------------------------------
if [[ -n "${JAVA_HOME:-}" ]]; then JAVA="$JAVA_HOME/bin/java"; else JAVA="$(command -v java)"; fi
[[ -x "$JAVA" ]] || { echo "java not found (set JAVA_HOME)" >&2; exit 1; }

# --- Classpath (resolved once with Maven, then cached) -----------------------
POM="$HERE/pom.xml"
POM_SHA="$(sha256sum "$POM" | cut -c1-16)"
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/alpespartner-pulsar"
CP_FILE="${PULSAR_CLASSPATH_FILE:-$CACHE_DIR/classpath-$POM_SHA.txt}"

classpath_ok() {
  [[ -s "$CP_FILE" ]] || return 1
  local jar
  # every jar must still be in the local Maven repository
  while IFS= read -r -d ':' jar; do
    [[ -f "$jar" ]] || return 1
  done < <(tr -d '\n' < "$CP_FILE"; printf ':')
}

if ! classpath_ok; then
  PULSAR_VERSION="$(sed -n 's:.*<pulsar.version>\(.*\)</pulsar.version>.*:\1:p' "$POM" | head -n1)"
  MVN_LOG="${PULSAR_MVN_LOG:-$CACHE_DIR/maven-$POM_SHA.log}"
  mkdir -p "$(dirname "$CP_FILE")" "$(dirname "$MVN_LOG")"
  # The one line said while Maven works (its own output goes to MVN_LOG).
  echo "resolving Apache Pulsar ${PULSAR_VERSION}'s jars with Maven (first run only: about a minute and ~270 MB into ~/.m2; log: $MVN_LOG)" >&2
  command -v "${MVN:-mvn}" >/dev/null || { echo "run-standalone: Maven (mvn) not found; it is needed once to resolve the jars" >&2; exit 1; }
  tmp="$CP_FILE.tmp.$$"
  if ! "${MVN:-mvn}" -q -B -ntp -Dstyle.color=never -f "$POM" \
      -Dmaven.wagon.http.retryHandler.count=3 \
      org.apache.maven.plugins:maven-dependency-plugin:3.8.1:build-classpath \
      -Dmdep.includeScope=runtime -Dmdep.outputFile="$tmp" > "$MVN_LOG" 2>&1; then
    echo "run-standalone: Maven could not resolve the classpath; the end of $MVN_LOG:" >&2
    tail -n 20 "$MVN_LOG" >&2
    rm -f "$tmp"
    exit 1
  fi
  mv -f "$tmp" "$CP_FILE"
  # drop classpath files cached for older versions of pom.xml
  find "$CACHE_DIR" -maxdepth 1 -name 'classpath-*.txt' ! -name "classpath-$POM_SHA.txt" -delete 2>/dev/null || true
  classpath_ok || { echo "run-standalone: classpath in $CP_FILE is incomplete" >&2; exit 1; }
fi
if [[ $RESOLVE_ONLY -eq 1 ]]; then
  echo "$CP_FILE"
  exit 0
fi

# --- Data dir layout + rendered config ----------------------------------------
# PulsarStandalone switches to (legacy) ZooKeeper mode when its ZooKeeper data
# dir exists or PULSAR_STANDALONE_USE_ZOOKEEPER=1|true is set. We always want
# the RocksDB metadata store, so refuse to start on a ZooKeeper-mode data dir.
ZK_DIR="$DATA_DIR/zookeeper"
if [[ -e "$ZK_DIR" ]]; then
  echo "run-standalone: $ZK_DIR exists; it would switch Pulsar to ZooKeeper mode. Remove it or use a fresh DATA_DIR." >&2
  exit 1
fi
mkdir -p "$DATA_DIR/conf" "$DATA_DIR/logs"
CONF="$DATA_DIR/conf/standalone.conf"
{
  cat "$HERE/standalone.conf"
  echo
  echo "### --- rendered by run-standalone.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ) --- ###"
  echo "brokerServicePort=$BROKER_PORT"
  echo "webServicePort=$WEB_PORT"
  if [[ -n "${PULSAR_BOOKIE_PORT:-}" ]]; then
    # Pulsar only honours --bookkeeper-port when ephemeral ports are allowed.
    echo "allowEphemeralPorts=true"
  fi
  if [[ -n "${PULSAR_STANDALONE_EXTRA_CONF:-}" ]]; then
    echo "### --- from $PULSAR_STANDALONE_EXTRA_CONF --- ###"
    cat "$PULSAR_STANDALONE_EXTRA_CONF"
    echo
  fi
} > "$CONF.tmp"
mv -f "$CONF.tmp" "$CONF"

# --- JVM flags (mirroring Pulsar's bin/pulsar for JDK 17) ----------------------
PULSAR_MEM="${PULSAR_MEM:--Xms256m -Xmx512m -XX:MaxDirectMemorySize=256m}"
JVM_OPTS=(
  $PULSAR_MEM
  -XX:+UseG1GC -XX:+PerfDisableSharedMem -XX:+ExitOnOutOfMemoryError
  -Djava.net.preferIPv4Stack=true
  -Djute.maxbuffer=10485760
  -Dzookeeper.clientTcpKeepAlive=true
  # BookKeeper: posix_fadvise + DirectMemoryCRC32Digest
  --add-opens java.base/java.io=ALL-UNNAMED
  --add-opens java.base/java.util.zip=ALL-UNNAMED
  # JvmDefaultGCMetricsLogger / MBeanStatsGenerator
  --add-opens java.management/sun.management=ALL-UNNAMED
  --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
  # LinuxInfoUtils
  --add-opens java.base/jdk.internal.platform=ALL-UNNAMED
  # Netty: DirectByteBuffer, Unsafe, DNS resolver
  --add-opens java.base/java.nio=ALL-UNNAMED
  --add-opens java.base/jdk.internal.misc=ALL-UNNAMED
  --add-opens java.base/sun.net=ALL-UNNAMED
  -Dio.netty.tryReflectionSetAccessible=true
  -Dorg.apache.pulsar.shade.io.netty.tryReflectionSetAccessible=true
  -Dpulsar.allocator.exit_on_oom=true
  # BookKeeper client/bookie talk to the metadata store through Pulsar's driver
  -Dbookkeeper.metadata.bookie.drivers=org.apache.pulsar.metadata.bookkeeper.PulsarMetadataBookieDriver
  -Dbookkeeper.metadata.client.drivers=org.apache.pulsar.metadata.bookkeeper.PulsarMetadataClientDriver
  # Logging
  -Dlog4j.configurationFile="$HERE/log4j2.xml"
  -Dlog4j.shutdownHookEnabled=false
  -Dlog4j2.is.webapp=false
  -Dpulsar.log.dir="$DATA_DIR/logs"
  -Dpulsar.log.file=pulsar-standalone.log
  -Dpulsar.log.level="${PULSAR_LOG_LEVEL:-info}"
  -Dpulsar.log.console.level="${PULSAR_LOG_CONSOLE_LEVEL:-warn}"
  -Djava.io.tmpdir="$DATA_DIR/tmp"
)
mkdir -p "$DATA_DIR/tmp"

STANDALONE_ARGS=(
  --config "$CONF"
  --metadata-dir "$DATA_DIR/metadata"
  --bookkeeper-dir "$DATA_DIR/bookkeeper"
  --zookeeper-dir "$ZK_DIR"
  --num-bookies 1
  -nfw -nss
)
if [[ -n "${PULSAR_BOOKIE_PORT:-}" ]]; then
  STANDALONE_ARGS+=(--bookkeeper-port "$PULSAR_BOOKIE_PORT")
fi

# Relative paths used internally by Pulsar (e.g. "data/") land in DATA_DIR.
cd "$DATA_DIR"
# shellcheck disable=SC2086
exec env -u PULSAR_STANDALONE_USE_ZOOKEEPER "$JAVA" "${JVM_OPTS[@]}" ${PULSAR_EXTRA_OPTS:-} \
  -cp "$(cat "$CP_FILE")" \
  org.apache.pulsar.PulsarStandaloneStarter "${STANDALONE_ARGS[@]}"
