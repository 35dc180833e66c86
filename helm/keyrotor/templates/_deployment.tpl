{{/*
A keyrotor Deployment (worker or scheduler): dict "root" $ "component" NAME "c" <component values>
"args" <container args> "replicas" true|false "poolSize" <database pool size per process>.
*/}}
{{- define "keyrotor.deployment" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $c := .c -}}
{{- $ctx := dict "root" $root "component" .component "c" $c "metrics" true -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "keyrotor.fullname" $root }}-{{ .component }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "keyrotor.componentLabels" $ctx | nindent 4 }}
spec:
  {{- if .replicas }}
  replicas: {{ $c.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "keyrotor.componentSelectorLabels" $ctx | nindent 6 }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 1
      maxUnavailable: 0
  template:
    metadata:
      labels:
        {{- include "keyrotor.podLabels" $ctx | nindent 8 }}
      {{- with (include "keyrotor.podAnnotations" $ctx) }}
      annotations:
        {{- . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "keyrotor.serviceAccountName" $root }}
      # The API-server token is not automounted: Vault Kubernetes auth gets its own projected token,
      # and only a worker that writes Kubernetes Secrets (kubernetesSecrets) gets an API-server one.
      automountServiceAccountToken: false
      enableServiceLinks: false
      terminationGracePeriodSeconds: {{ $c.terminationGracePeriodSeconds }}
      securityContext:
        {{- toYaml $v.podSecurityContext | nindent 8 }}
      {{- with (include "keyrotor.podPlacement" $ctx) }}
      {{- . | nindent 6 }}
      {{- end }}
      {{- with $v.initContainers }}
      initContainers:
        {{- include "keyrotor.userContainers" (dict "root" $root "containers" .) | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ include "keyrotor.image" $root | quote }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          args:
            {{- toYaml .args | nindent 12 }}
          ports:
            - name: metrics
              containerPort: {{ $v.metrics.port }}
              protocol: TCP
          env:
            {{- include "keyrotor.env" (dict "root" $root "vault" true "inventory" true "metrics" true "app" (printf "keyrotor-%s" .component) "size" .poolSize) | nindent 12 }}
          {{- with $v.extraEnvFrom }}
          envFrom:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- include "keyrotor.probes" $root | nindent 10 }}
          resources:
            {{- toYaml $c.resources | nindent 12 }}
          securityContext:
            {{- toYaml $v.containerSecurityContext | nindent 12 }}
          volumeMounts:
            {{- include "keyrotor.volumeMounts" (dict "root" $root "vault" true "inventory" true "metrics" true "kubeApi" (and (eq .component "worker") (not (empty $v.kubernetesSecrets)))) | nindent 12 }}
        {{- with $v.extraContainers }}
        {{- include "keyrotor.userContainers" (dict "root" $root "containers" .) | nindent 8 }}
        {{- end }}
      volumes:
        {{- include "keyrotor.volumes" (dict "root" $root "vault" true "inventory" true "metrics" true "kubeApi" (and (eq .component "worker") (not (empty $v.kubernetesSecrets)))) | nindent 8 }}
{{- end -}}
