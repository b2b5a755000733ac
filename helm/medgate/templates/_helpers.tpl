{{/*
Names, labels, checks and the cluster configuration file that every medgate binary reads.
*/}}

{{- define "medgate.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "medgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "medgate.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "medgate.labels" -}}
{{ include "medgate.selectorLabels" . }}
app.kubernetes.io/part-of: medgate
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ include "medgate.chart" .root }}
medgate.io/country: {{ .root.Values.country | quote }}
{{- end -}}

{{- define "medgate.image" -}}
{{- $repo := required "image.repository: the medgate image is required (helm/Containerfile builds it)" .Values.image.repository -}}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The pods of a service: sharing also serves audit. */}}
{{- define "medgate.binary" -}}
medgate-{{ . }}
{{- end -}}

{{/* The Secret holding a service's certificate, key and CA (tls.crt, tls.key, ca.crt). */}}
{{- define "medgate.tlsSecret" -}}
{{- printf "%s-%s-tls" (include "medgate.fullname" .root) .service -}}
{{- end -}}

{{- define "medgate.spiffeId" -}}
{{- printf "spiffe://%s/service/%s" .root.Values.trustDomain .service -}}
{{- end -}}

{{/* A database endpoint as libpq keywords. Every value is checked: no quoting is needed. */}}
{{- define "medgate.conninfo" -}}
{{- $db := .db -}}
{{- $where := .where -}}
{{- $host := required (printf "%s.host: the database's host name is required" $where) $db.host -}}
{{- $port := ternary $db.port 5432 (hasKey $db "port") -}}
{{- $dbname := required (printf "%s.dbname: required" $where) $db.dbname -}}
{{- $user := required (printf "%s.user: required" $where) $db.user -}}
{{- range $k, $v := dict "host" $host "dbname" $dbname "user" $user -}}
{{- if not (regexMatch "^[A-Za-z0-9._-]+$" (toString $v)) -}}
{{- fail (printf "%s.%s: '%v' may hold only letters, digits, '.', '_' and '-'" $where $k $v) -}}
{{- end -}}
{{- end -}}
{{- include "medgate.checkPort" (dict "port" $port "where" (printf "%s.port" $where)) -}}
{{- $parts := list (printf "host=%s port=%d dbname=%s user=%s passfile=/run/medgate/secrets/pgpass" $host (int64 $port) $dbname $user) -}}
{{- $parts = append $parts .root.Values.database.options -}}
{{- $parts = append $parts "sslrootcert=/etc/medgate/db-ca/ca.crt" -}}
{{- join " " $parts -}}
{{- end -}}

{{/* A TCP port: a whole number from 1 to 65535. */}}
{{- define "medgate.checkPort" -}}
{{- $p := .port -}}
{{- if not (regexMatch "^[0-9]+$" (toString $p)) -}}
{{- fail (printf "%s: '%v' is not a TCP port (1-65535)" .where $p) -}}
{{- end -}}
{{- if or (lt (int64 $p) 1) (gt (int64 $p) 65535) -}}
{{- fail (printf "%s: %v is not a TCP port (1-65535)" .where $p) -}}
{{- end -}}
{{- end -}}

{{- define "medgate.dbBlock" -}}
{{- $pool := .root.Values.database.pool -}}
conninfo: {{ include "medgate.conninfo" . | quote }}
pool_size: {{ int64 $pool.poolSize }}
max_waiters: {{ int64 $pool.maxWaiters }}
acquire_timeout_ms: {{ int64 $pool.acquireTimeoutMs }}
statement_timeout_ms: {{ int64 $pool.statementTimeoutMs }}
{{- end -}}

{{/* An ISO 3166-1 alpha-2 code given in the values, or rendering stops naming where it is. */}}
{{- define "medgate.checkTerritory" -}}
{{- if not (kindIs "string" .code) -}}
{{- fail (printf "%s: '%v' is not an ISO 3166-1 alpha-2 code: quote it (\"NO\"), since YAML reads NO, ON, Y and the like as booleans" .where .code) -}}
{{- end -}}
{{- if not (regexMatch "^[A-Z]{2}$" .code) -}}
{{- fail (printf "%s: '%s' is not an ISO 3166-1 alpha-2 code (two capital letters)" .where .code) -}}
{{- end -}}
{{- end -}}

{{/*
Egress rules to the databases of the kinds named (control, shards, keyVaults), one rule per kind:
that kind's networks (networkPolicy.databaseCIDRs.KIND) on that kind's ports only.
Called with (dict "root" $ "kinds" (list ...)).
*/}}
{{- define "medgate.databaseEgress" -}}
{{- $v := .root.Values -}}
{{- range $kind := .kinds -}}
{{- $dbs := list -}}
{{- if eq $kind "control" -}}{{- $dbs = list $v.control -}}{{- end -}}
{{- range $v.regions -}}
{{- if eq $kind "shards" -}}{{- $dbs = append $dbs .db -}}{{- end -}}
{{- if eq $kind "keyVaults" -}}{{- $dbs = append $dbs .keysDb -}}{{- end -}}
{{- end -}}
{{- $ports := dict -}}
{{- range $db := $dbs -}}
{{- $port := 5432 -}}
{{- if and $db (hasKey $db "port") -}}{{- $port = $db.port -}}{{- end -}}
{{- $_ := set $ports (toString (int64 $port)) true -}}
{{- end }}
- to:
    {{- range (index $v.networkPolicy.databaseCIDRs $kind) }}
    - ipBlock: {cidr: {{ . | quote }}}
    {{- end }}
  ports:
    {{- range $p, $_ := $ports }}
    - {port: {{ $p }}, protocol: TCP}
    {{- end }}
{{- end -}}
{{- end -}}

{{/* The egress rule to the cluster DNS (networkPolicy.dns). */}}
{{- define "medgate.dnsEgress" -}}
{{- $v := .Values -}}
- to:
    {{- toYaml $v.networkPolicy.dns.peers | nindent 4 }}
  ports:
    {{- toYaml $v.networkPolicy.dns.ports | nindent 4 }}
{{- end -}}

{{/* A network in CIDR notation (IPv4 or IPv6). */}}
{{- define "medgate.checkCidr" -}}
{{- if not (and (kindIs "string" .cidr) (or (regexMatch "^([0-9]{1,3}\\.){3}[0-9]{1,3}/[0-9]{1,2}$" .cidr) (regexMatch "^[0-9a-fA-F:]+/[0-9]{1,3}$" .cidr))) -}}
{{- fail (printf "%s: '%v' is not a network in CIDR notation (10.0.0.0/16, 2001:db8::/32)" .where .cidr) -}}
{{- end -}}
{{- end -}}

{{/*
Stops rendering on values that would give a cluster storing data where the residency rules do not
allow, exposing it, or one that cannot start: fail closed, before anything is deployed.
*/}}
{{- define "medgate.validate" -}}
{{- $v := .Values -}}
{{- $country := required "country: the ISO 3166-1 alpha-2 code of the country this cluster serves is required" $v.country -}}
{{- include "medgate.checkTerritory" (dict "code" $country "where" "country") -}}
{{- $td := required "trustDomain: the SPIFFE trust domain of the cluster's certificates is required" $v.trustDomain -}}
{{- if not (regexMatch "^[a-z0-9.-]+$" $td) -}}
{{- fail (printf "trustDomain: '%s' may hold only lower-case letters, digits, '.' and '-'" $td) -}}
{{- end -}}
{{- $owner := required "database.passfileSecret: a Secret with key pgpass (a libpq password file) is required" $v.database.passfileSecret -}}
{{- /* Each service pod holds its own role's password only: not the schema owner's, not another
service's. */ -}}
{{- $servicePassfiles := dict -}}
{{- range $service := list "routing" "consent" "ingest" "sharing" -}}
{{- $secret := required (printf "database.servicePassfileSecrets.%s: a Secret with key pgpass holding the medgate_%s role's password is required" $service $service) (index ($v.database.servicePassfileSecrets | default dict) $service) -}}
{{- if eq (toString $secret) (toString $owner) -}}
{{- fail (printf "database.servicePassfileSecrets.%s: '%s' is database.passfileSecret, the schema owner's: a service's pods may hold only its own role's password" $service $secret) -}}
{{- end -}}
{{- if hasKey $servicePassfiles (toString $secret) -}}
{{- fail (printf "database.servicePassfileSecrets.%s: '%s' is also %s's: each service's pods may hold only its own role's password" $service $secret (get $servicePassfiles (toString $secret))) -}}
{{- end -}}
{{- $_ := set $servicePassfiles (toString $secret) $service -}}
{{- end -}}
{{- $_ := required "database.caSecret: a Secret with key ca.crt (the databases' certificate authority) is required: connections to the databases verify their certificates" $v.database.caSecret -}}
{{- /* The database options: TLS verified, and only keywords that change neither credentials, nor
endpoints, nor the files the chart sets, nor TLS below 1.2. */ -}}
{{- $options := toString $v.database.options -}}
{{- if not (regexMatch "(^|\\s)sslmode=verify-full(\\s|$)" $options) -}}
{{- fail (printf "database.options: '%s' must set sslmode=verify-full: health data goes to the databases over TLS whose certificate names the host" $options) -}}
{{- end -}}
{{- $allowed := list "sslmode" "connect_timeout" "application_name" "keepalives" "keepalives_idle" "keepalives_interval" "keepalives_count" "tcp_user_timeout" "target_session_attrs" "ssl_min_protocol_version" -}}
{{- range $word := splitList " " $options -}}
{{- if $word -}}
{{- if not (regexMatch "^[a-z_]+=[A-Za-z0-9._-]+$" $word) -}}
{{- fail (printf "database.options: '%s' is not a libpq keyword=value without quotes, spaces or paths" $word) -}}
{{- end -}}
{{- $key := (splitList "=" $word) | first -}}
{{- if not (has $key $allowed) -}}
{{- fail (printf "database.options: '%s' may not be set here (allowed: %s; credentials live in database.passfileSecret and database.servicePassfileSecrets, endpoints in control and regions, the CA in database.caSecret)" $key (join ", " $allowed)) -}}
{{- end -}}
{{- if and (eq $key "sslmode") (ne $word "sslmode=verify-full") -}}
{{- fail (printf "database.options: '%s': sslmode must be verify-full" $word) -}}
{{- end -}}
{{- if and (eq $key "ssl_min_protocol_version") (not (has $word (list "ssl_min_protocol_version=TLSv1.2" "ssl_min_protocol_version=TLSv1.3"))) -}}
{{- fail (printf "database.options: '%s': TLSv1.2 or TLSv1.3 only" $word) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $_ := required "sharing.kekSecret: a Secret with the key-encryption key (under sharing.kekKey) is required" $v.sharing.kekSecret -}}
{{- if gt (len $v.sharing.previousKekKeys) 8 -}}
{{- fail "sharing.previousKekKeys: at most 8 (retire a KEK once the sharing pods have rewrapped its keys)" -}}
{{- end -}}
{{- if or (not (regexMatch "^[-_a-zA-Z0-9][-._a-zA-Z0-9]*$" (toString $v.sharing.kekKey))) -}}
{{- fail (printf "sharing.kekKey: '%v' is not a key of a Secret (letters, digits, '-', '_', '.')" $v.sharing.kekKey) -}}
{{- end -}}
{{- range $i, $key := $v.sharing.previousKekKeys -}}
{{- if or (not (regexMatch "^[-_a-zA-Z0-9][-._a-zA-Z0-9]*$" (toString $key))) (eq (toString $key) (toString $v.sharing.kekKey)) -}}
{{- fail (printf "sharing.previousKekKeys[%d]: '%v' is not a key of sharing.kekSecret other than sharing.kekKey (letters, digits, '-', '_', '.')" $i $key) -}}
{{- end -}}
{{- end -}}
{{- if ne (len $v.sharing.previousKekKeys) (len (uniq $v.sharing.previousKekKeys)) -}}
{{- fail "sharing.previousKekKeys: each key once" -}}
{{- end -}}
{{- if and (get (default dict $v.sharing.settings) "kek_rewrap") (not $v.sharing.previousKekKeys) -}}
{{- fail "sharing.settings.kek_rewrap: rewraps the keys of the KEKs sharing.previousKekKeys names, which names none" -}}
{{- end -}}
{{- if $v.tls.certManager.enabled -}}
{{- $_ := required "tls.certManager.issuerRef.name: the cert-manager issuer is required (or set tls.certManager.enabled=false and provide the services' Secrets)" $v.tls.certManager.issuerRef.name -}}
{{- end -}}
{{- if not $v.regions -}}
{{- fail "regions: at least one region is required (its id, territories, db and keysDb)" -}}
{{- end -}}
{{- $ids := list -}}
{{- $hosts := dict -}}
{{- $covered := false -}}
{{- /* Every database is one of its own: two regions on one shard would store a region's
       patients where the directory says another holds them, and a vault on its shard's server
       would share the shard's backups, where an erasure's destroyed key would live on. */ -}}
{{- $databases := dict -}}
{{- if $v.control.host -}}
{{- $_ := set $databases (printf "%v:%d/%v" $v.control.host (int64 (default 5432 $v.control.port)) $v.control.dbname) "control" -}}
{{- end -}}
{{- range $i, $r := $v.regions -}}
{{- $id := required (printf "regions[%d].id: required" $i) $r.id -}}
{{- if not (regexMatch "^[a-z0-9][a-z0-9-]*$" $id) -}}
{{- fail (printf "regions[%d].id: '%s' may hold only lower-case letters, digits and '-'" $i $id) -}}
{{- end -}}
{{- if gt (len $id) 30 -}}
{{- fail (printf "regions[%d].id: '%s' is over 30 characters (it is part of the ids of what the region stores)" $i $id) -}}
{{- end -}}
{{- if has $id $ids -}}
{{- fail (printf "regions[%d].id: region '%s' is listed twice" $i $id) -}}
{{- end -}}
{{- $ids = append $ids $id -}}
{{- if not $r.territories -}}
{{- fail (printf "regions[%d].territories: region '%s' must name the territories whose data it may hold" $i $id) -}}
{{- end -}}
{{- range $j, $t := $r.territories -}}
{{- include "medgate.checkTerritory" (dict "code" $t "where" (printf "regions[%d].territories[%d]" $i $j)) -}}
{{- end -}}
{{- $_ := set $hosts $id $r.territories -}}
{{- if has $country $r.territories }}{{ $covered = true }}{{ end -}}
{{- if not $r.db -}}
{{- fail (printf "regions[%d].db: region '%s' needs its shard" $i $id) -}}
{{- end -}}
{{- if not $r.keysDb -}}
{{- fail (printf "regions[%d].keysDb: region '%s' needs its key vault (a database apart from the shard)" $i $id) -}}
{{- end -}}
{{- range $which, $db := dict "db" $r.db "keysDb" $r.keysDb -}}
{{- $key := printf "%v:%d/%v" $db.host (int64 (default 5432 $db.port)) $db.dbname -}}
{{- if hasKey $databases $key -}}
{{- fail (printf "regions[%d].%s: %s is also %s's: each region's shard and key vault, and the control database, are databases of their own" $i $which $key (get $databases $key)) -}}
{{- end -}}
{{- $_ := set $databases $key (printf "regions[%d].%s" $i $which) -}}
{{- end -}}
{{- if and (eq (toString $r.keysDb.host) (toString $r.db.host)) (eq (int64 (default 5432 $r.keysDb.port)) (int64 (default 5432 $r.db.port))) -}}
{{- fail (printf "regions[%d].keysDb: on the server of the shard of region '%s' (%v:%d): the key vault is a server apart, backed up apart with a short retention, or an erasure's destroyed key lives on in the shard's backups" $i $id $r.db.host (int64 (default 5432 $r.db.port))) -}}
{{- end -}}
{{- end -}}
{{- if not $covered -}}
{{- fail (printf "regions: no region may hold data of %s, the country this cluster serves (add %s to a region's territories)" $country $country) -}}
{{- end -}}
{{- range $i, $rule := $v.routing.seedRules -}}
{{- $t := required (printf "routing.seedRules[%d].territory: required" $i) $rule.territory -}}
{{- include "medgate.checkTerritory" (dict "code" $t "where" (printf "routing.seedRules[%d].territory" $i)) -}}
{{- if not $rule.regions -}}
{{- fail (printf "routing.seedRules[%d].regions: the regions of territory %s are required" $i $t) -}}
{{- end -}}
{{- range $rule.regions -}}
{{- if not (has . $ids) -}}
{{- fail (printf "routing.seedRules[%d].regions: '%s' is not one of this cluster's regions (%s)" $i . (join ", " $ids)) -}}
{{- end -}}
{{- if not (has $t (get $hosts .)) -}}
{{- fail (printf "routing.seedRules[%d].regions: region '%s' may not hold data of %s (its territories: %s)" $i . $t (join ", " (get $hosts .))) -}}
{{- end -}}
{{- end -}}
{{- range $j, $r := $rule.readableFrom -}}
{{- include "medgate.checkTerritory" (dict "code" $r "where" (printf "routing.seedRules[%d].readableFrom[%d]" $i $j)) -}}
{{- end -}}
{{- end -}}
{{- /* Keys the chart writes itself may not come in through the services' settings. */ -}}
{{- range $section, $keys := dict "routing" (list "seed_rules") "sharing" (list "kek_file" "kek_env" "previous_kek_files") -}}
{{- range $keys -}}
{{- if hasKey (index $v $section).settings . -}}
{{- fail (printf "%s.settings.%s: set by the chart (%s)" $section . (ternary "routing.seedRules" "sharing.kekSecret and sharing.previousKekKeys" (eq $section "routing"))) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- /* The services refuse to start when a device could be given to another patient before the
ingest instances' cached answer for it expires (libs/routing_client reassign_window): refused here,
before a rollout that would crash-loop. */ -}}
{{- $ttl := 30 -}}
{{- $ingestSettings := default dict $v.ingest.settings -}}
{{- if hasKey $ingestSettings "device_cache_ttl_seconds" -}}
{{- $ttl = int (index $ingestSettings "device_cache_ttl_seconds") -}}
{{- end -}}
{{- $wait := 35 -}}
{{- $routingSettings := default dict $v.routing.settings -}}
{{- if hasKey $routingSettings "device_reassign_wait_seconds" -}}
{{- $wait = int (index $routingSettings "device_reassign_wait_seconds") -}}
{{- end -}}
{{- if le $wait $ttl -}}
{{- fail (printf "routing.settings.device_reassign_wait_seconds (%d) must exceed ingest.settings.device_cache_ttl_seconds (%d): a device given to another patient sooner could have samples filed under the former one" $wait $ttl) -}}
{{- end -}}
{{- $ports := dict -}}
{{- range $name, $s := $v.services -}}
{{- if not (has $name (list "routing" "consent" "ingest" "sharing" "audit")) -}}
{{- fail (printf "services.%s: not a medgate service (routing, consent, ingest, sharing, audit)" $name) -}}
{{- end -}}
{{- include "medgate.checkPort" (dict "port" $s.port "where" (printf "services.%s.port" $name)) -}}
{{- range $j, $c := $s.clientCIDRs -}}
{{- include "medgate.checkCidr" (dict "cidr" $c "where" (printf "services.%s.clientCIDRs[%d]" $name $j)) -}}
{{- end -}}
{{- end -}}
{{- $cidrs := $v.networkPolicy.databaseCIDRs -}}
{{- $kinds := list "control" "shards" "keyVaults" -}}
{{- if not (kindIs "map" $cidrs) -}}
{{- fail "networkPolicy.databaseCIDRs: name the networks of each kind of database apart, {control: [...], shards: [...], keyVaults: [...]}: each pod may then reach only the databases its service uses" -}}
{{- end -}}
{{- range $kind, $_ := $cidrs -}}
{{- if not (has $kind $kinds) -}}
{{- fail (printf "networkPolicy.databaseCIDRs.%s: not a kind of database (control, shards, keyVaults)" $kind) -}}
{{- end -}}
{{- end -}}
{{- range $kind := $kinds -}}
{{- $list := index $cidrs $kind -}}
{{- if and $list (not (kindIs "slice" $list)) -}}
{{- fail (printf "networkPolicy.databaseCIDRs.%s: '%v' is not a list of networks" $kind $list) -}}
{{- end -}}
{{- range $j, $c := $list -}}
{{- include "medgate.checkCidr" (dict "cidr" $c "where" (printf "networkPolicy.databaseCIDRs.%s[%d]" $kind $j)) -}}
{{- if regexMatch "/0+$" $c -}}
{{- fail (printf "networkPolicy.databaseCIDRs.%s[%d]: '%s' is every address: name the databases' networks" $kind $j $c) -}}
{{- end -}}
{{- end -}}
{{- if and $v.networkPolicy.enabled (not $list) -}}
{{- fail (printf "networkPolicy.databaseCIDRs.%s: the networks of the %s are required: the pods may connect to the databases their service uses, DNS and each other only (or set networkPolicy.enabled=false where the cluster enforces this otherwise)" $kind (index (dict "control" "control database" "shards" "regions' shards" "keyVaults" "regions' key vaults") $kind)) -}}
{{- end -}}
{{- end -}}
{{- if $v.networkPolicy.enabled -}}
{{- if not $v.networkPolicy.dns.peers -}}
{{- fail "networkPolicy.dns.peers: the cluster DNS pods are required (an empty list would let the pods reach every address on the DNS ports)" -}}
{{- end -}}
{{- range $i, $p := $v.networkPolicy.dns.peers -}}
{{- if and (kindIs "map" $p) (hasKey $p "namespaceSelector") (empty $p.namespaceSelector) -}}
{{- fail (printf "networkPolicy.dns.peers[%d]: an empty namespaceSelector is every namespace, where any pod labelled as the DNS would receive what the pods send to it: name the DNS's namespace (kubernetes.io/metadata.name: kube-system)" $i) -}}
{{- end -}}
{{- end -}}
{{- if not $v.networkPolicy.dns.ports -}}
{{- fail "networkPolicy.dns.ports: the DNS ports are required (an empty list would let the pods reach the DNS peers on every port)" -}}
{{- end -}}
{{- end -}}
{{- range $k, $_ := ($v.affinity | default dict) -}}
{{- if not (has $k (list "nodeAffinity" "podAffinity" "podAntiAffinity")) -}}
{{- fail (printf "affinity.%s: not nodeAffinity, podAffinity or podAntiAffinity" $k) -}}
{{- end -}}
{{- end -}}
{{- range $k, $_ := (($v.affinity | default dict).podAntiAffinity | default dict) -}}
{{- if not (has $k (list "preferredDuringSchedulingIgnoredDuringExecution" "requiredDuringSchedulingIgnoredDuringExecution")) -}}
{{- fail (printf "affinity.podAntiAffinity.%s: not one of Kubernetes' two kinds of term" $k) -}}
{{- end -}}
{{- end -}}
{{- $pdb := $v.podDisruptionBudget.maxUnavailable -}}
{{- if not (or (and (kindIs "string" $pdb) (regexMatch "^([1-9][0-9]?|100)%$" $pdb)) (and (or (kindIs "float64" $pdb) (kindIs "int64" $pdb) (kindIs "int" $pdb)) (ge (int64 $pdb) 1))) -}}
{{- fail (printf "podDisruptionBudget.maxUnavailable: '%v' must be a whole number of pods (at least 1) or a percentage from 1%% to 100%% (\"25%%\")" $pdb) -}}
{{- end -}}
{{- if not (regexMatch "^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$" (toString $v.clusterDomain)) -}}
{{- fail (printf "clusterDomain: '%v' is not a DNS domain (cluster.local)" $v.clusterDomain) -}}
{{- end -}}
{{- if not (has (toString $v.image.pullPolicy) (list "Always" "IfNotPresent" "Never")) -}}
{{- fail (printf "image.pullPolicy: '%v' is not Always, IfNotPresent or Never" $v.image.pullPolicy) -}}
{{- end -}}
{{- if eq (int64 $v.services.sharing.port) (int64 $v.services.audit.port) -}}
{{- fail "services.audit.port: audit is served by the sharing pods and needs a port other than services.sharing.port" -}}
{{- end -}}
{{- end -}}

{{/* medgate.yaml: the cluster configuration file (libs/common/config.h). */}}
{{- define "medgate.config" -}}
{{- include "medgate.configText" (dict "root" . "ingestReplicas" true) -}}
{{- end -}}

{{/*
What the pods of one service read of medgate.yaml, for the checksum that rolls them when it
changes: ingest.instances (ingest's replica count) is ingest's alone, so scaling ingest does not
roll the other services.
*/}}
{{- define "medgate.configChecksum" -}}
{{- include "medgate.configText" (dict "root" .root "ingestReplicas" (eq .service "ingest")) | sha256sum -}}
{{- end -}}

{{/* The configuration's text; without ingest.instances unless "ingestReplicas". */}}
{{- define "medgate.configText" -}}
{{- $root := .root -}}
{{- $withReplicas := .ingestReplicas -}}
{{- $v := $root.Values -}}
{{- $ns := $root.Release.Namespace -}}
# The cluster configuration of medgate in {{ $v.country }} (release {{ $root.Release.Name }}).
trust_domain: {{ $v.trustDomain | quote }}
ca: /etc/medgate/ca/ca.crt
{{- if $v.tls.crlSecret }}
crl_dir: /etc/medgate/crl
{{- end }}
limits:
  max_message_bytes: {{ int64 $v.limits.maxMessageBytes }}
  max_concurrent_streams: {{ int64 $v.limits.maxConcurrentStreams }}
  max_threads: {{ int64 $v.limits.maxThreads }}
  max_connection_age_seconds: {{ int64 $v.limits.maxConnectionAgeSeconds }}
  max_connection_age_grace_seconds: {{ int64 $v.limits.maxConnectionAgeGraceSeconds }}
  drain_seconds: {{ int64 $v.limits.drainSeconds }}
  tenant_calls_per_second: {{ int64 $v.limits.tenantCallsPerSecond }}
  tenant_call_burst: {{ int64 $v.limits.tenantCallBurst }}
  max_health_watches_per_caller: {{ int64 $v.limits.maxHealthWatchesPerCaller }}
  max_health_watches: {{ int64 $v.limits.maxHealthWatches }}
control_db:
  {{- include "medgate.dbBlock" (dict "root" $root "db" $v.control "where" "control") | nindent 2 }}
regions:
{{- range $i, $r := $v.regions }}
  - id: {{ $r.id | quote }}
    territories: {{ toJson $r.territories }}
    db:
      {{- include "medgate.dbBlock" (dict "root" $root "db" $r.db "where" (printf "regions[%d].db" $i)) | nindent 6 }}
    keys_db:
      {{- include "medgate.dbBlock" (dict "root" $root "db" $r.keysDb "where" (printf "regions[%d].keysDb" $i)) | nindent 6 }}
{{- end }}
services:
{{- range $name := list "routing" "consent" "ingest" "sharing" "audit" }}
{{- $s := index $v.services $name }}
  {{ $name }}:
    listen: {{ printf "%s:%d" $v.listenHost (int64 $s.port) | quote }}
    address: {{ printf "%s-%s.%s.svc.%s:%d" (include "medgate.fullname" $root) $name $ns $v.clusterDomain (int64 $s.port) | quote }}
    identity: {{ include "medgate.spiffeId" (dict "root" $root "service" $name) | quote }}
    tls:
      cert: /etc/medgate/tls/{{ $name }}/tls.crt
      key: /etc/medgate/tls/{{ $name }}/tls.key
      refresh_seconds: {{ int64 $v.tls.refreshSeconds }}
{{- end }}
routing:
  {{- with $v.routing.settings }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  seed_rules:
  {{- range $v.routing.seedRules }}
    - territory: {{ .territory | quote }}
      regions: {{ toJson .regions }}
      readable_from: {{ toJson (default (list) .readableFrom) }}
  {{- else }} []
  {{- end }}
{{- with $v.consent.settings }}
consent:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if hasKey (default dict $v.ingest.settings) "instances" }}
{{- fail "ingest.settings.instances: set by the chart from services.ingest.replicas (the tenant quota is shared by the replicas); remove it" }}
{{- end }}
ingest:
  {{- if $withReplicas }}
  # The tenant quota (tenant_samples_per_second, tenant_burst) and the read rate are the
  # deployment's: each replica enforces its share.
  instances: {{ int64 $v.services.ingest.replicas }}
  {{- end }}
  {{- with $v.ingest.settings }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
sharing:
  kek_file: /run/medgate/secrets/keks/{{ $v.sharing.kekKey }}
  {{- with $v.sharing.previousKekKeys }}
  previous_kek_files:
  {{- range . }}
    - /run/medgate/secrets/keks/{{ . }}
  {{- end }}
  {{- end }}
  {{- with $v.sharing.settings }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}
