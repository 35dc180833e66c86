{{/*
A hook Job running one keyrotor command: dict "root" $ "component" NAME "args" <args> "weight" N
"inventory" BOOL "inventoryConfigMap" NAME.
Hooks touch only the database: no Vault settings, no ServiceAccount token.
*/}}
{{- define "keyrotor.hookJob" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $h := $v.hooks -}}
{{- $ctx := dict "root" $root "component" .component "c" (dict) -}}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ include "keyrotor.fullname" $root }}-{{ .component }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "keyrotor.componentLabels" $ctx | nindent 4 }}
  annotations:
    helm.sh/hook: pre-install,pre-upgrade
    helm.sh/hook-weight: {{ .weight | quote }}
    helm.sh/hook-delete-policy: {{ $h.deletePolicy }}
spec:
  backoffLimit: {{ $h.backoffLimit }}
  activeDeadlineSeconds: {{ $h.activeDeadlineSeconds }}
  ttlSecondsAfterFinished: {{ $h.ttlSecondsAfterFinished }}
  template:
    metadata:
      labels:
        {{- include "keyrotor.podLabels" $ctx | nindent 8 }}
      {{- with (include "keyrotor.podAnnotations" $ctx) }}
      annotations:
        {{- . | nindent 8 }}
      {{- end }}
    spec:
      restartPolicy: Never
      {{- with $h.serviceAccountName }}
      serviceAccountName: {{ . }}
      {{- end }}
      automountServiceAccountToken: false
      enableServiceLinks: false
      securityContext:
        {{- toYaml $v.podSecurityContext | nindent 8 }}
      {{- with (include "keyrotor.podPlacement" $ctx) }}
      {{- . | nindent 6 }}
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ include "keyrotor.image" $root | quote }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          args:
            {{- toYaml .args | nindent 12 }}
          env:
            {{- include "keyrotor.env" (dict "root" $root "vault" false "inventory" .inventory "metrics" false "app" (printf "keyrotor-%s" .component) "size" 1) | nindent 12 }}
          resources:
            {{- toYaml $h.resources | nindent 12 }}
          securityContext:
            {{- toYaml $v.containerSecurityContext | nindent 12 }}
          volumeMounts:
            {{- include "keyrotor.volumeMounts" (dict "root" $root "vault" false "inventory" .inventory "inventoryConfigMap" .inventoryConfigMap) | nindent 12 }}
      volumes:
        {{- include "keyrotor.volumes" (dict "root" $root "vault" false "inventory" .inventory "inventoryConfigMap" .inventoryConfigMap) | nindent 8 }}
{{- end -}}
