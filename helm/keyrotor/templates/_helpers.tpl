{{/* vim: set filetype=mustache: */}}

{{/* Chart name, 63 characters at most (DNS label). */}}
{{- define "keyrotor.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Fully qualified app name. Truncated to 48 characters so that the longest suffix the chart adds
("-inventory-hook", 15 characters) still fits a 63-character DNS label.
*/}}
{{- define "keyrotor.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 48 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "keyrotor.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "keyrotor.labels" -}}
helm.sh/chart: {{ include "keyrotor.chart" . }}
{{ include "keyrotor.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: keyrotor
{{- end -}}

{{- define "keyrotor.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keyrotor.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of one component: dict "root" $ "component" "worker". */}}
{{- define "keyrotor.componentLabels" -}}
{{ include "keyrotor.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "keyrotor.componentSelectorLabels" -}}
{{ include "keyrotor.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "keyrotor.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "keyrotor.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository:tag, or repository@digest when a digest is given. */}}
{{- define "keyrotor.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "keyrotor.databaseSecretName" -}}
{{- default (printf "%s-database" (include "keyrotor.fullname" .)) .Values.database.existingSecret -}}
{{- end -}}

{{- define "keyrotor.inventoryEnabled" -}}
{{- if or .Values.config.existingConfigMap .Values.config.inventory -}}true{{- end -}}
{{- end -}}

{{/* The inventory document: a YAML string (e.g. from --set-file, comments kept) or an object. */}}
{{- define "keyrotor.inventoryData" -}}
{{- if kindIs "string" .Values.config.inventory -}}
{{- .Values.config.inventory -}}
{{- else -}}
{{- toYaml .Values.config.inventory -}}
{{- end -}}
{{- end -}}

{{- define "keyrotor.inventoryConfigMapName" -}}
{{- default (printf "%s-inventory" (include "keyrotor.fullname" .)) .Values.config.existingConfigMap -}}
{{- end -}}

{{- define "keyrotor.vaultKubernetesAuth" -}}
{{- if and .Values.vault.address (eq .Values.vault.auth.method "kubernetes") -}}true{{- end -}}
{{- end -}}

{{/*
Refuse values that would put a credential into a rendered manifest, with a message that says
what to do instead. (The schema checks shapes; these are the checks it cannot express clearly.)
*/}}
{{- define "keyrotor.validate" -}}
{{- if regexMatch "://[^/@]*:[^/@]*@" .Values.redis.url -}}
{{- fail "redis.url contains a password: store the URL in a Secret and set redis.existingSecret (and redis.key) instead" -}}
{{- end -}}
{{- if regexMatch "[?&]sentinel_password=" .Values.redis.url -}}
{{- fail "redis.url contains the sentinels' password: store the URL in a Secret and set redis.existingSecret (and redis.key) instead" -}}
{{- end -}}
{{- if and .Values.vault.address (eq .Values.vault.auth.method "token") (not .Values.vault.auth.token.existingSecret) -}}
{{- fail "vault.auth.method is token but vault.auth.token.existingSecret is empty: name the Secret holding VAULT_TOKEN" -}}
{{- end -}}
{{- if and .Values.vault.address (eq .Values.vault.auth.method "kubernetes") (not .Values.vault.auth.kubernetes.role) -}}
{{- fail "vault.auth.method is kubernetes but vault.auth.kubernetes.role is empty: name the Vault role bound to the ServiceAccount" -}}
{{- end -}}
{{- if and .Values.vault.tls.caSecret .Values.vault.tls.caConfigMap -}}
{{- fail "set only one of vault.tls.caSecret and vault.tls.caConfigMap" -}}
{{- end -}}
{{- if and .Values.worker.keda.enabled .Values.worker.autoscaling.enabled -}}
{{- fail "worker.keda.enabled and worker.autoscaling.enabled both scale the workers: enable only one (KEDA creates its own HPA)" -}}
{{- end -}}
{{- if and .Values.worker.keda.enabled .Values.redis.existingSecret (not .Values.worker.keda.address) -}}
{{- fail "worker.keda.enabled with redis.existingSecret: set worker.keda.address (host:port, or the sentinels' list with worker.keda.sentinelMaster) and, for a password, worker.keda.authenticationRef" -}}
{{- end -}}
{{- if and .Values.database.maxConnections (gt (include "keyrotor.maxConnections" . | int) (int .Values.database.maxConnections)) -}}
{{- fail (printf "up to %s PostgreSQL connections at the replica maximum exceed database.maxConnections (%d): lower worker processes/threads, database.pool sizes or the replica maximum, or put PgBouncer in front (docs/scaling.md)" (include "keyrotor.maxConnections" .) (int .Values.database.maxConnections)) -}}
{{- end -}}
{{- range .Values.extraEnv -}}
{{- if and (hasKey . "value") (regexMatch "(?i)(PASSWORD|TOKEN|SECRET|API_?KEY|CREDENTIAL)" (toString .name)) -}}
{{- fail (printf "extraEnv %s looks like a secret but has a literal value: use valueFrom.secretKeyRef" .name) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Environment of a keyrotor container: dict "root" $ "vault" BOOL "inventory" BOOL "metrics" BOOL.
Hook Jobs get no Vault settings (migrations and `config apply` only touch the database) and no
metrics server (one-shot commands).
*/}}
{{- define "keyrotor.env" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
- name: KEYROTOR_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "keyrotor.databaseSecretName" $root }}
      key: {{ $v.database.key }}
{{- if $v.redis.existingSecret }}
- name: KEYROTOR_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $v.redis.existingSecret }}
      key: {{ $v.redis.key }}
{{- else }}
- name: KEYROTOR_REDIS_URL
  value: {{ $v.redis.url | quote }}
{{- end }}
- name: KEYROTOR_ENV
  value: {{ $v.environment | default "production" | quote }}
- name: KEYROTOR_LOG_LEVEL
  value: {{ $v.logLevel | quote }}
- name: KEYROTOR_LOG_FORMAT
  value: {{ $v.logFormat | quote }}
- name: KEYROTOR_QUEUE_NAMESPACE
  value: {{ $v.queueNamespace | quote }}
- name: KEYROTOR_HTTP_TIMEOUT_S
  value: {{ $v.httpTimeoutSeconds | quote }}
- name: KEYROTOR_METRICS_PORT
  value: {{ ternary $v.metrics.port 0 (default false .metrics) | quote }}
{{- if .metrics }}
- name: KEYROTOR_METRICS_MAX_KEY_SERIES
  value: {{ $v.metrics.maxKeySeries | quote }}
{{- end }}
{{- include "keyrotor.dbEnv" . }}
{{- if and .inventory (include "keyrotor.inventoryEnabled" $root) }}
- name: KEYROTOR_CONFIG
  value: {{ printf "%s/%s" (trimSuffix "/" $v.config.mountPath) $v.config.key | quote }}
{{- end }}
{{- if and .vault $v.vault.address }}
- name: VAULT_ADDR
  value: {{ $v.vault.address | quote }}
- name: KEYROTOR_VAULT_MOUNT
  value: {{ $v.vault.mount | quote }}
- name: KEYROTOR_VAULT_STAGING_PREFIX
  value: {{ $v.vault.stagingPrefix | quote }}
{{- with $v.vault.namespace }}
- name: VAULT_NAMESPACE
  value: {{ . | quote }}
{{- end }}
{{- if or $v.vault.tls.caSecret $v.vault.tls.caConfigMap }}
- name: VAULT_CACERT
  value: {{ printf "/etc/keyrotor/vault-ca/%s" $v.vault.tls.caKey | quote }}
{{- end }}
{{- if eq $v.vault.auth.method "token" }}
- name: VAULT_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $v.vault.auth.token.existingSecret }}
      key: {{ $v.vault.auth.token.key }}
{{- else }}
- name: KEYROTOR_VAULT_K8S_ROLE
  value: {{ $v.vault.auth.kubernetes.role | quote }}
- name: KEYROTOR_VAULT_K8S_MOUNT
  value: {{ $v.vault.auth.kubernetes.mountPath | quote }}
- name: KEYROTOR_VAULT_K8S_JWT_PATH
  value: /var/run/secrets/vault/token
{{- end }}
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volume mounts of a keyrotor container: dict "root" $ "vault" BOOL "inventory" BOOL. */}}
{{- define "keyrotor.volumeMounts" -}}
{{- $v := .root.Values -}}
- name: tmp
  mountPath: /tmp
{{- if and .inventory (include "keyrotor.inventoryEnabled" .root) }}
- name: inventory
  mountPath: {{ $v.config.mountPath }}
  readOnly: true
{{- end }}
{{- if and .vault (include "keyrotor.vaultKubernetesAuth" .root) }}
- name: vault-token
  mountPath: /var/run/secrets/vault
  readOnly: true
{{- end }}
{{- if and .vault $v.vault.address (or $v.vault.tls.caSecret $v.vault.tls.caConfigMap) }}
- name: vault-ca
  mountPath: /etc/keyrotor/vault-ca
  readOnly: true
{{- end }}
{{- if .kubeApi }}
{{- /* Where the kubernetes client's in-cluster configuration looks (load_incluster_config). */}}
- name: kube-api-token
  mountPath: /var/run/secrets/kubernetes.io/serviceaccount
  readOnly: true
{{- end }}
{{- with $v.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Volumes matching keyrotor.volumeMounts; "inventoryConfigMap" NAME overrides the inventory's
ConfigMap (the hook Jobs read a hook copy that exists before the release's own objects).
*/}}
{{- define "keyrotor.volumes" -}}
{{- $v := .root.Values -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ $v.tmpSizeLimit }}
{{- if and .inventory (include "keyrotor.inventoryEnabled" .root) }}
- name: inventory
  configMap:
    name: {{ default (include "keyrotor.inventoryConfigMapName" .root) .inventoryConfigMap }}
    items:
      - key: {{ $v.config.key }}
        path: {{ $v.config.key }}
{{- end }}
{{- if and .vault (include "keyrotor.vaultKubernetesAuth" .root) }}
{{- /* Only a Vault-audience token, refreshed by the kubelet; no API-server token is mounted. */}}
- name: vault-token
  projected:
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: {{ $v.vault.auth.kubernetes.expirationSeconds }}
          {{- with $v.vault.auth.kubernetes.audience }}
          audience: {{ . | quote }}
          {{- end }}
{{- end }}
{{- if and .vault $v.vault.address $v.vault.tls.caSecret }}
- name: vault-ca
  secret:
    secretName: {{ $v.vault.tls.caSecret }}
    items:
      - key: {{ $v.vault.tls.caKey }}
        path: {{ $v.vault.tls.caKey }}
{{- else if and .vault $v.vault.address $v.vault.tls.caConfigMap }}
- name: vault-ca
  configMap:
    name: {{ $v.vault.tls.caConfigMap }}
    items:
      - key: {{ $v.vault.tls.caKey }}
        path: {{ $v.vault.tls.caKey }}
{{- end }}
{{- if .kubeApi }}
{{- /* An API-server token for the kubernetes_secret integration: short-lived, refreshed by the kubelet. */}}
- name: kube-api-token
  projected:
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: 3600
      - configMap:
          name: kube-root-ca.crt
          items:
            - {key: ca.crt, path: ca.crt}
      - downwardAPI:
          items:
            - path: namespace
              fieldRef: {apiVersion: v1, fieldPath: metadata.namespace}
{{- end }}
{{- with $v.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Pod-level settings shared by every pod: dict "root" $ "c" <component values or empty dict>
"component" NAME. Component values win over the global ones.
*/}}
{{- define "keyrotor.podPlacement" -}}
{{- $v := .root.Values -}}
{{- $c := .c -}}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with (default $v.nodeSelector $c.nodeSelector) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $v.tolerations $c.tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $v.affinity $c.affinity) }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default $v.topologySpreadConstraints $c.topologySpreadConstraints) }}
topologySpreadConstraints:
  {{- range . }}
  {{- $tsc := deepCopy . }}
  {{- if not (hasKey $tsc "labelSelector") }}
  {{- $_ := set $tsc "labelSelector" (dict "matchLabels" (include "keyrotor.componentSelectorLabels" (dict "root" $.root "component" $.component) | fromYaml)) }}
  {{- end }}
  - {{ toYaml $tsc | indent 4 | trim }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* Pod annotations: the inventory checksum rolls pods when the inventory changes. */}}
{{- define "keyrotor.podAnnotations" -}}
{{- $v := .root.Values -}}
{{- $a := merge (dict) (default (dict) .c.podAnnotations) $v.podAnnotations -}}
{{- if and $v.config.inventory (not $v.config.existingConfigMap) -}}
{{- $_ := set $a "checksum/inventory" (include (print .root.Template.BasePath "/configmap.yaml") .root | sha256sum) -}}
{{- end -}}
{{- with $a }}{{ toYaml . }}{{ end -}}
{{- end -}}

{{/* Pod labels: standard component labels plus user labels (which cannot override them). */}}
{{- define "keyrotor.podLabels" -}}
{{- $v := .root.Values -}}
{{- $std := include "keyrotor.componentLabels" . | fromYaml -}}
{{- $l := merge $std (default (dict) .c.podLabels) $v.podLabels -}}
{{- if .metrics }}{{ $_ := set $l "keyrotor.io/metrics" "true" }}{{ end -}}
{{- toYaml $l -}}
{{- end -}}

{{/*
Probes of a long-running container: GET /healthz on the metrics port with the configured timings,
unless a probe brings its own handler (httpGet/exec/tcpSocket/grpc) or is disabled.
*/}}
{{- define "keyrotor.probes" -}}
{{- range $name, $key := dict "startup" "startupProbe" "liveness" "livenessProbe" "readiness" "readinessProbe" }}
{{- $p := deepCopy (get $.Values.probes $name) }}
{{- if ne (toString (default "true" (toString (get $p "enabled")))) "false" }}
{{- $_ := unset $p "enabled" }}
{{- if not (or (hasKey $p "httpGet") (hasKey $p "exec") (hasKey $p "tcpSocket") (hasKey $p "grpc")) }}
{{- $_ := set $p "httpGet" (dict "path" "/healthz" "port" "metrics") }}
{{- end }}
{{ $key }}:
  {{- toYaml $p | nindent 2 }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
Database settings of a process: dict with "app" (application_name) and "size" (pool size); none
when "app" is absent. Pool sizes per process; see database.pool in values.yaml.
*/}}
{{- define "keyrotor.dbEnv" -}}
{{- if .app }}
{{- $db := .root.Values.database }}
- name: KEYROTOR_DB_APPLICATION_NAME
  value: {{ .app | quote }}
- name: KEYROTOR_DB_POOL_SIZE
  value: {{ .size | quote }}
- name: KEYROTOR_DB_MAX_OVERFLOW
  value: {{ $db.pool.maxOverflow | quote }}
- name: KEYROTOR_DB_POOL_TIMEOUT_S
  value: {{ $db.pool.timeoutSeconds | quote }}
{{- if $db.pgbouncer }}
- name: KEYROTOR_DB_PREPARED_STATEMENTS
  value: "false"
{{- end }}
{{- end }}
{{- end -}}

{{/* Pool size of one worker process: database.pool.workerSize, or threads + 1 (the lease renewer). */}}
{{- define "keyrotor.workerPoolSize" -}}
{{- if .Values.database.pool.workerSize }}{{ .Values.database.pool.workerSize }}{{ else }}{{ add .Values.worker.threads 1 }}{{ end -}}
{{- end -}}

{{/* Most worker replicas: KEDA's or the HPA's maximum, else the fixed count. */}}
{{- define "keyrotor.maxWorkerReplicas" -}}
{{- if .Values.worker.keda.enabled }}{{ .Values.worker.keda.maxReplicaCount }}
{{- else if .Values.worker.autoscaling.enabled }}{{ .Values.worker.autoscaling.maxReplicas }}
{{- else }}{{ .Values.worker.replicas }}{{ end -}}
{{- end -}}

{{/* Worst-case PostgreSQL connections of the release (docs/scaling.md). */}}
{{- define "keyrotor.maxConnections" -}}
{{- $v := .Values -}}
{{- $worker := mul (include "keyrotor.maxWorkerReplicas" . | int) $v.worker.processes (add (include "keyrotor.workerPoolSize" . | int) $v.database.pool.maxOverflow) -}}
{{- $scheduler := mul $v.scheduler.replicas (add $v.database.pool.schedulerSize $v.database.pool.maxOverflow) -}}
{{- add $worker $scheduler 2 -}}
{{- end -}}

{{/*
User containers (extraContainers / initContainers): the chart's restricted securityContext and a
writable /tmp (the root filesystem is read-only) are forced onto each.
*/}}
{{- define "keyrotor.userContainers" -}}
{{- range .containers }}
{{- $c := deepCopy . }}
{{- $_ := set $c "securityContext" $.root.Values.containerSecurityContext }}
{{- $mounts := default (list) $c.volumeMounts }}
{{- $hasTmp := false }}
{{- range $mounts }}{{ if eq .mountPath "/tmp" }}{{ $hasTmp = true }}{{ end }}{{ end }}
{{- if not $hasTmp }}{{ $_ := set $c "volumeMounts" (append $mounts (dict "name" "tmp" "mountPath" "/tmp")) }}{{ end }}
- {{ toYaml $c | nindent 2 | trim }}
{{- end }}
{{- end -}}
