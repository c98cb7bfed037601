#!/usr/bin/env bash
# Make what docker-compose.secure.yml mounts (docs/security.md), into a new folder (default ./secrets):
#   ca.pem ca.key              a CA of your own (keep ca.key offline once done)
#   server.pem server.key      Kafka's and Redis' certificate: DNS kafka, redis, localhost, IP 127.0.0.1
#   client.pem client.key      the services' client certificate (Kafka's SSL listener asks for one)
#   kafka/                     the same, as the apache/kafka image takes them: PKCS12 stores, their
#                              passwords in files, and client-ssl.properties for its healthcheck
#   ingest_tokens.json predict_tokens.json   one client token each (add your clients)
#   env                        DRIFTLINE_MODEL_KEY, DRIFTLINE_ADMIN_TOKEN, DRIFTLINE_REDIS_PASSWORD,
#                              for `docker compose --env-file secrets/env ...`
# Needs openssl and keytool (any JDK). The folder is private (0700); its files are readable inside it,
# since compose mounts them with their own modes into containers that run as other users.
set -euo pipefail
out=${1:-secrets}
days=${DAYS:-825}
if [ -e "$out" ]; then
  echo "$out exists: remove it, or name another folder" >&2
  exit 1
fi
umask 077
mkdir -p "$out/kafka"
cd "$out"

token() { openssl rand -base64 33 | tr '+/' '-_'; }  # 44 URL-safe characters, 264 random bits

openssl req -x509 -newkey rsa:2048 -nodes -days "$days" -subj "/CN=driftline CA" -keyout ca.key -out ca.pem \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

issue() {  # NAME SUBJECT EXTENSIONS
  openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
  printf '%b' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days "$days" -extfile "$1.ext" \
    -out "$1.pem" 2>/dev/null
  rm "$1.csr" "$1.ext"
}
# The broker is its own client too (inter-broker listener): its certificate serves both ends.
issue server "/CN=kafka" "subjectAltName=DNS:kafka,DNS:redis,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"
issue client "/CN=driftline" "extendedKeyUsage=clientAuth\n"

token > kafka/keystore_password
token > kafka/truststore_password
openssl pkcs12 -export -name kafka -in server.pem -inkey server.key -certfile ca.pem \
  -passout file:kafka/keystore_password -out kafka/kafka.keystore.p12
keytool -importcert -noprompt -alias driftline-ca -file ca.pem -storetype PKCS12 \
  -keystore kafka/kafka.truststore.p12 -storepass:file kafka/truststore_password >/dev/null 2>&1
cat > kafka/client-ssl.properties <<PROPERTIES
security.protocol=SSL
ssl.keystore.type=PKCS12
ssl.keystore.location=/etc/kafka/secrets/kafka.keystore.p12
ssl.keystore.password=$(cat kafka/keystore_password)
ssl.key.password=$(cat kafka/keystore_password)
ssl.truststore.type=PKCS12
ssl.truststore.location=/etc/kafka/secrets/kafka.truststore.p12
ssl.truststore.password=$(cat kafka/truststore_password)
PROPERTIES

printf '[{"name": "producer", "token": "%s"}]\n' "$(token)" > ingest_tokens.json
printf '[{"name": "app", "token": "%s"}]\n' "$(token)" > predict_tokens.json
cat > env <<ENV
DRIFTLINE_MODEL_KEY=$(token)$(token)
DRIFTLINE_ADMIN_TOKEN=$(token)
DRIFTLINE_REDIS_PASSWORD=$(token)
ENV

chmod 0700 .
chmod -R a+rX -- *
echo "made $(pwd): CA, certificates, Kafka stores, client tokens; start with" \
     "docker compose --env-file $out/env -f docker-compose.yml -f docker-compose.secure.yml up --build"
