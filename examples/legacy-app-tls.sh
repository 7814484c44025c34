#!/usr/bin/env bash
# Example 1, the legacy app: a client hard-wired to plaintext http://localhost:PORT
# reaches a backend that only speaks TLS (nginx, certificate from a private CA),
# because legate originates verified TLS for it.
#   bash examples/legacy-app-tls.sh
source "$(dirname "$0")/lib/common.sh"
for t in nginx openssl curl; do command -v $t >/dev/null || fail "needs $t"; done

say "a private CA and a server certificate for localhost (openssl)"
cd "$WORK"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=example-ca 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout srv.key -out srv.csr -subj /CN=localhost 2>/dev/null
printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n' > ext.cnf
openssl x509 -req -in srv.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out srv.crt -days 2 -extfile ext.cnf 2>/dev/null
cd - >/dev/null

TLS_PORT=$(free_port); APP_PORT=$(free_port); ADMIN=$(free_port)
say "the TLS-only backend: nginx on 127.0.0.1:$TLS_PORT"
mkdir -p "$WORK/nginx"
cat > "$WORK/nginx/nginx.conf" <<CONF
daemon off; master_process off; worker_processes 1; error_log $WORK/nginx/error.log; pid $WORK/nginx/nginx.pid;
events {}
http { access_log off; client_body_temp_path $WORK/nginx; proxy_temp_path $WORK/nginx; fastcgi_temp_path $WORK/nginx; uwsgi_temp_path $WORK/nginx; scgi_temp_path $WORK/nginx;
  server { listen 127.0.0.1:$TLS_PORT ssl; ssl_protocols TLSv1.2 TLSv1.3; ssl_certificate $WORK/srv.crt; ssl_certificate_key $WORK/srv.key;
           location / { return 200 "hello from the TLS-only backend (\$ssl_protocol)\n"; } } }
CONF
nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" & PIDS+=($!)
wait_for nginx curl -fsk "https://127.0.0.1:$TLS_PORT/"
echo "plaintext straight to it fails: $(curl -s "http://127.0.0.1:$TLS_PORT/" | grep -o '<title>[^<]*' | sed 's/<title>//')"

say "legate: plaintext 127.0.0.1:$APP_PORT -> TLS to the backend, verified against the CA"
mkdir -p "$WORK/routes"
cat > "$WORK/routes/legate.yaml" <<YAML
listeners:
  - { name: legacy, listen: "127.0.0.1:$APP_PORT", protocol: http, cluster: secure-backend }
clusters:
  - name: secure-backend
    endpoints: [ "127.0.0.1:$TLS_PORT" ]
    tls: { ca: "$WORK/ca.crt", sni: localhost }
YAML
start_legate "$WORK/routes" "$ADMIN"

say "the legacy client: curl http://localhost:$APP_PORT/"
answer=$(curl -fsS "http://localhost:$APP_PORT/")
echo "$answer"
[[ $answer == "hello from the TLS-only backend (TLSv1.3)" ]] || fail "unexpected answer: $answer"
ok=$(metric "$ADMIN" 'legate_upstream_connects_total{cluster="secure-backend",result="ok"}')
tls_err=$(metric "$ADMIN" 'legate_upstream_connects_total{cluster="secure-backend",result="tls_error"}')
echo "legate_upstream_connects_total: ok=$ok tls_error=$tls_err"
[ "${tls_err:-0}" = 0 ] || fail "TLS errors counted"
say "PASS: the plaintext client reached the TLS-only backend through legate"
