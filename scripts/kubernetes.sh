#!/usr/bin/env bash
# A real single-node Kubernetes for codestation's Kubernetes runtime tests, on this machine:
#
#   scripts/kubernetes.sh build   the binaries, from Debian's source package (about 6.5 minutes
#                                 on 2 cores the first time; cached in $KUBE_CACHE after)
#   scripts/kubernetes.sh start [IMAGE...]
#                                 etcd, the control plane, a kubelet with a private dockerd,
#                                 the images named loaded from the host's Docker engine;
#                                 prints the kubeconfig's path (idempotent)
#   scripts/kubernetes.sh load IMAGE...   more images into the node
#   scripts/kubernetes.sh image           codestation's own image: scripts/image.sh
#   scripts/kubernetes.sh kubectl ARGS    kubectl, on this cluster
#   scripts/kubernetes.sh stop    all of it, and what it left (containers, mounts, the bridge)
#
# No registry offers Kubernetes binaries here; Debian's `kubernetes` source (1.20.2, its Go
# dependencies vendored) builds offline with Debian's Go 1.19. One node, no network plugin (so
# NetworkPolicy objects are accepted, not enforced), no storage provisioner: Pods use hostPath.
# Everything lives under $KUBE_STATE (default /var/lib/codestation-kube); nothing of the host's
# own Docker engine is touched but for reading the sandbox image out of it.
set -euo pipefail

VERSION=1.20.2
KUBE_CACHE=${KUBE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/codestation/kubernetes/$VERSION}
KUBE_STATE=${KUBE_STATE:-/var/lib/codestation-kube}
BRIDGE=csk8s0
NODE_IP=10.244.77.1
SERVICE_RANGE=10.244.78.0/24
NODE_NAME=codestation-node
RUN=$KUBE_STATE/run
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DOCKER_SOCK=$RUN/docker.sock

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

build() {
  if [ -x "$KUBE_CACHE/bin/kubelet" ] && [ -x "$KUBE_CACHE/bin/kubectl" ]; then
    say "Kubernetes $VERSION: cached in $KUBE_CACHE"
    return
  fi
  local need=()
  [ -x /usr/lib/go-1.19/bin/go ] || need+=(golang-1.19-go)
  command -v rsync >/dev/null || need+=(rsync)
  command -v jq >/dev/null || need+=(jq)
  command -v etcd >/dev/null || need+=(etcd-server)
  command -v socat >/dev/null || need+=(socat)
  command -v gcc >/dev/null || need+=(gcc libc6-dev)
  if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  local work
  work=$(mktemp -d /var/tmp/kube-build.XXXXXX)
  # Debian's source, fetched with a private source list: the system's apt sources stay as
  # they are. The mirrors are the ones apt already uses.
  local mirror security
  mirror=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  security=$(awk '/^URIs:/ && $2 ~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  mkdir -p "$work/lists/partial"
  {
    echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${mirror:-http://deb.debian.org/debian} bookworm main"
    echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${security:-http://deb.debian.org/debian-security} bookworm-security main"
  } >"$work/sources.list"
  local apt=(apt-get -qq -o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
             -o "Dir::State::Lists=$work/lists")
  say "fetching Debian's kubernetes source"
  "${apt[@]}" update
  (cd "$work" && "${apt[@]}" source --download-only kubernetes >/dev/null && dpkg-source -x --no-check ./*.dsc ksrc >/dev/null)
  say "building Kubernetes $VERSION (about 6.5 minutes on 2 cores)"
  (
    cd "$work/ksrc"
    export PATH=/usr/lib/go-1.19/bin:$PATH CGO_ENABLED=0 KUBE_GIT_VERSION=v$VERSION \
      KUBE_GIT_TREE_STATE=clean KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20
    make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet cmd/kubectl" >/dev/null
    mkdir -p "$work/out/bin"
    cp -L _output/local/bin/linux/amd64/{kube-apiserver,kube-controller-manager,kube-scheduler,kubelet,kubectl} "$work/out/bin/"
    # The pause container every Pod holds its namespaces with, from the same source.
    gcc -Os -static -o "$work/out/bin/pause" build/pause/linux/pause.c
  )
  mkdir -p "$(dirname "$KUBE_CACHE")"
  rm -rf "$KUBE_CACHE"
  mv "$work/out" "$KUBE_CACHE"
  rm -rf "$work"
  say "Kubernetes $VERSION built into $KUBE_CACHE"
}

# Waits up to $1 seconds for the command after it to succeed.
until_ok() {
  local seconds=$1; shift
  for _ in $(seq 1 $((seconds * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  "$@"
}

spawn() {  # spawn NAME COMMAND...: in the background, its pid and log under $RUN
  local name=$1; shift
  setsid "$@" >"$RUN/$name.log" 2>&1 < /dev/null &
  echo $! >"$RUN/$name.pid"
}

kctl() { "$KUBE_CACHE/bin/kubectl" --kubeconfig "$KUBE_STATE/kubeconfig" "$@"; }

# Whether every part of the cluster runs and the node's dockerd answers: a part that died (a
# test that restarts "dockerd" must mean the host's, but may not) makes `start` start anew.
running() {
  local name
  for name in etcd apiserver controllers scheduler kubelet dockerd; do
    [ -f "$RUN/$name.pid" ] && kill -0 "$(cat "$RUN/$name.pid")" 2>/dev/null || return 1
  done
  docker -H "unix://$DOCKER_SOCK" info >/dev/null 2>&1
}

start() {
  build
  running && { load_images "$@"; say "already running"; echo "$KUBE_STATE/kubeconfig"; return; }
  stop >/dev/null 2>&1 || true
  local bin=$KUBE_CACHE/bin
  mkdir -p "$RUN" "$KUBE_STATE"/{pki,etcd,kubelet,docker,docker-exec,plugins,dockershim}
  chmod 700 "$KUBE_STATE"

  say "the node's bridge $BRIDGE ($NODE_IP/24)"
  ip link add "$BRIDGE" type bridge
  ip addr add "$NODE_IP/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  # What a network plugin does on a real cluster: Pods reach each other across the bridge (the
  # host's Docker sets FORWARD's policy to DROP, which bridged traffic meets where br_netfilter
  # is loaded) and the world beyond the node, behind its address.
  pod_rules add

  # A dockerd of the node's own: the host's engine and its containers stay out of it. These
  # VMs cannot set a negative oom_score_adj (no CAP_SYS_RESOURCE), which the kubelet asks of
  # runc: a wrapper sets it to 0.
  cat >"$KUBE_STATE/runc" <<'WRAP'
#!/bin/sh
bundle=""; prev=""
for arg in "$@"; do [ "$prev" = "--bundle" ] && bundle=$arg; prev=$arg; done
if [ -n "$bundle" ] && [ -f "$bundle/config.json" ]; then
  tmp=$(mktemp "$bundle/.config.XXXXXX")
  jq 'if (.process.oomScoreAdj // 0) < 0 then .process.oomScoreAdj = 0 else . end' \
    "$bundle/config.json" >"$tmp" && mv "$tmp" "$bundle/config.json"
fi
exec runc "$@"
WRAP
  chmod 755 "$KUBE_STATE/runc"
  echo '{}' >"$KUBE_STATE/docker.json"
  say "the node's dockerd"
  spawn dockerd dockerd -H "unix://$DOCKER_SOCK" --data-root "$KUBE_STATE/docker" \
    --exec-root "$KUBE_STATE/docker-exec" --pidfile "$RUN/dockerd.own.pid" \
    --config-file "$KUBE_STATE/docker.json" --bridge "$BRIDGE" --iptables=false --ip-masq=false \
    --add-runtime "k8s=$KUBE_STATE/runc" --default-runtime k8s
  until_ok 30 docker -H "unix://$DOCKER_SOCK" info
  local ndocker=(docker -H "unix://$DOCKER_SOCK")
  "${ndocker[@]}" image inspect k8s-pause:3.4.1 >/dev/null 2>&1 || \
    tar -C "$bin" -c pause | "${ndocker[@]}" import -c 'ENTRYPOINT ["/pause"]' - k8s-pause:3.4.1 >/dev/null
  load_images "$@"

  local pki=$KUBE_STATE/pki token
  [ -f "$pki/sa.key" ] || openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  # The API server proves itself to the kubelet (logs, exec) with a certificate of a CA made
  # here; the kubelet answers nobody else: Pods reach the node's address too.
  if [ ! -f "$pki/kubelet-client.crt" ]; then
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=codestation-kube-ca \
      -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=kube-apiserver" \
      -keyout "$pki/kubelet-client.key" -out "$pki/kubelet-client.csr" 2>/dev/null
    openssl x509 -req -in "$pki/kubelet-client.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
      -CAcreateserial -days 3650 -out "$pki/kubelet-client.crt" 2>/dev/null
  fi
  # etcd holds every Secret: it takes only clients (and peers) with a certificate of that CA,
  # the API server's; other users of this machine reach its port on the loopback too.
  if [ ! -f "$pki/etcd.crt" ]; then
    openssl req -newkey rsa:2048 -nodes -subj /CN=etcd -addext subjectAltName=IP:127.0.0.1 \
      -keyout "$pki/etcd.key" -out "$pki/etcd.csr" 2>/dev/null
    openssl x509 -req -in "$pki/etcd.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
      -CAcreateserial -days 3650 -copy_extensions copyall -out "$pki/etcd.crt" 2>/dev/null
  fi
  chmod 600 "$pki"/*.key
  say "etcd"
  spawn etcd etcd --data-dir "$KUBE_STATE/etcd" \
    --listen-client-urls https://127.0.0.1:23790 --advertise-client-urls https://127.0.0.1:23790 \
    --listen-peer-urls https://127.0.0.1:23800 --initial-advertise-peer-urls https://127.0.0.1:23800 \
    --initial-cluster default=https://127.0.0.1:23800 \
    --cert-file "$pki/etcd.crt" --key-file "$pki/etcd.key" \
    --client-cert-auth --trusted-ca-file "$pki/ca.crt" \
    --peer-cert-file "$pki/etcd.crt" --peer-key-file "$pki/etcd.key" \
    --peer-client-cert-auth --peer-trusted-ca-file "$pki/ca.crt"
  token=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
  echo "$token,admin,admin,\"system:masters\"" >"$pki/tokens.csv"
  chmod 600 "$pki/tokens.csv"
  say "the API server"
  spawn apiserver "$bin/kube-apiserver" --etcd-servers https://127.0.0.1:23790 \
    --etcd-cafile "$pki/ca.crt" --etcd-certfile "$pki/kubelet-client.crt" \
    --etcd-keyfile "$pki/kubelet-client.key" --anonymous-auth=false \
    --secure-port 6443 --insecure-port 0 --advertise-address "$NODE_IP" --bind-address "$NODE_IP" \
    --cert-dir "$pki" --token-auth-file "$pki/tokens.csv" --authorization-mode Node,RBAC \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-cluster-ip-range "$SERVICE_RANGE" --allow-privileged=true \
    --kubelet-preferred-address-types InternalIP --enable-admission-plugins NodeRestriction \
    --kubelet-client-certificate "$pki/kubelet-client.crt" --kubelet-client-key "$pki/kubelet-client.key"
  cat >"$KUBE_STATE/kubeconfig" <<CONF
apiVersion: v1
kind: Config
clusters:
- name: codestation
  cluster: {server: "https://$NODE_IP:6443", certificate-authority: "$pki/apiserver.crt"}
users:
- name: admin
  user: {token: "$token"}
contexts:
- name: codestation
  context: {cluster: codestation, user: admin}
current-context: codestation
CONF
  chmod 600 "$KUBE_STATE/kubeconfig"
  until_ok 60 kctl get --raw /readyz

  say "the controller manager and the scheduler"
  spawn controllers "$bin/kube-controller-manager" --kubeconfig "$KUBE_STATE/kubeconfig" \
    --leader-elect=false --port 0 --secure-port 0 --use-service-account-credentials=false \
    --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/apiserver.crt"
  spawn scheduler "$bin/kube-scheduler" --kubeconfig "$KUBE_STATE/kubeconfig" \
    --leader-elect=false --port 0 --secure-port 0

  say "the kubelet"
  spawn kubelet "$bin/kubelet" --kubeconfig "$KUBE_STATE/kubeconfig" \
    --container-runtime docker --docker-endpoint "unix://$DOCKER_SOCK" \
    --pod-infra-container-image k8s-pause:3.4.1 --cgroup-driver cgroupfs --cgroups-per-qos=false \
    --enforce-node-allocatable= --fail-swap-on=false --make-iptables-util-chains=false \
    --node-ip "$NODE_IP" --address "$NODE_IP" --hostname-override "$NODE_NAME" \
    --anonymous-auth=false --client-ca-file "$pki/ca.crt" --authorization-mode AlwaysAllow \
    --read-only-port 0 \
    --healthz-port 0 --root-dir "$KUBE_STATE/kubelet" --volume-plugin-dir "$KUBE_STATE/plugins" \
    --experimental-dockershim-root-directory "$KUBE_STATE/dockershim" \
    --node-status-update-frequency 2s
  until_ok 60 sh -c "'$bin/kubectl' --kubeconfig '$KUBE_STATE/kubeconfig' get node '$NODE_NAME' \
    -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True"
  until_ok 60 kctl -n default get serviceaccount default
  say "Kubernetes $VERSION is up: KUBECONFIG=$KUBE_STATE/kubeconfig"
  echo "$KUBE_STATE/kubeconfig"
}

# pod_rules add|del: the host's rules for the Pods' traffic. Out through the node, behind its
# address, to the world, but to no private or link-local range (other sandboxes' bridges, a
# metadata service), as a session's `egress` network would have it.
pod_rules() {
  local chain=CS-K8S-PODS private
  if [ "$1" = add ]; then
    iptables -w -N "$chain" 2>/dev/null || iptables -w -F "$chain"
    iptables -w -A "$chain" -o "$BRIDGE" -j ACCEPT
    for private in 10.0.0.0/8 172.16.0.0/12 192.168.0.0/16 169.254.0.0/16 100.64.0.0/10; do
      iptables -w -A "$chain" -d "$private" -j DROP
    done
    iptables -w -A "$chain" -j ACCEPT
    iptables -w -C FORWARD -i "$BRIDGE" -j "$chain" 2>/dev/null \
      || iptables -w -I FORWARD -i "$BRIDGE" -j "$chain"
    iptables -w -C FORWARD -o "$BRIDGE" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT \
      2>/dev/null || iptables -w -I FORWARD -o "$BRIDGE" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
    iptables -w -t nat -C POSTROUTING -s "$NODE_IP/24" ! -o "$BRIDGE" -j MASQUERADE 2>/dev/null \
      || iptables -w -t nat -I POSTROUTING -s "$NODE_IP/24" ! -o "$BRIDGE" -j MASQUERADE
  else
    while iptables -w -D FORWARD -i "$BRIDGE" -j "$chain" 2>/dev/null; do :; done
    while iptables -w -D FORWARD -o "$BRIDGE" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT 2>/dev/null; do :; done
    while iptables -w -t nat -D POSTROUTING -s "$NODE_IP/24" ! -o "$BRIDGE" -j MASQUERADE 2>/dev/null; do :; done
    iptables -w -F "$chain" 2>/dev/null || true
    iptables -w -X "$chain" 2>/dev/null || true
  fi
}

# Images from the host's engine into the node's: Pods take them with imagePullPolicy
# IfNotPresent, no registry needed.
load_images() {
  local ndocker=(docker -H "unix://$DOCKER_SOCK") image
  for image in "$@"; do
    "${ndocker[@]}" image inspect "$image" >/dev/null 2>&1 && continue
    say "loading $image into the node"
    docker save "$image" | "${ndocker[@]}" load >/dev/null
  done
}

stop() {
  # Order matters: with etcd gone first the API server hangs for about a minute.
  local name
  for name in kubelet scheduler controllers apiserver etcd; do
    [ -f "$RUN/$name.pid" ] || continue
    kill "$(cat "$RUN/$name.pid")" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$(cat "$RUN/$name.pid")" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$(cat "$RUN/$name.pid")" 2>/dev/null || true
    rm -f "$RUN/$name.pid"
  done
  if [ -S "$DOCKER_SOCK" ]; then
    local ids
    ids=$(docker -H "unix://$DOCKER_SOCK" ps -aq 2>/dev/null || true)
    [ -n "$ids" ] && docker -H "unix://$DOCKER_SOCK" rm -f $ids >/dev/null 2>&1 || true
  fi
  if [ -f "$RUN/dockerd.pid" ]; then
    kill "$(cat "$RUN/dockerd.pid")" 2>/dev/null || true
    for _ in $(seq 1 75); do kill -0 "$(cat "$RUN/dockerd.pid")" 2>/dev/null || break; sleep 0.2; done
    rm -f "$RUN/dockerd.pid"
  fi
  # What the kubelet mounted (Secrets' tmpfs) and what it writes wherever it likes.
  grep -o " $KUBE_STATE/[^ ]*" /proc/mounts | sort -r | while read -r mount; do
    umount -l "$mount" 2>/dev/null || true
  done
  rm -rf "$KUBE_STATE/kubelet" "$KUBE_STATE/etcd" "$KUBE_STATE/dockershim" /var/log/pods /var/log/containers
  ip link del "$BRIDGE" 2>/dev/null || true
  pod_rules del
  say "Kubernetes stopped"
}

case "${1:-}" in
  build) build ;;
  start) shift; start "$@" ;;
  load) shift; load_images "$@" ;;
  image) exec "$ROOT/scripts/image.sh" ;;
  stop) stop ;;
  kubectl) shift; kctl "$@" ;;
  *) echo "usage: $0 build | start [IMAGE...] | load IMAGE... | image | stop | kubectl ARGS" >&2; exit 2 ;;
esac
