{{/*
The operator's name: the Deployment, its Services, ServiceAccount, Lease and RBAC objects.
Sidecars reach the config stream at https://<name>.<namespace>.svc:15010.
*/}}
{{- define "bulwark.fullname" -}}
{{- .Values.fullnameOverride | default "bulwark-operator" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "bulwark.name" -}}
{{- .Values.nameOverride | default .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "bulwark.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "bulwark.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bulwark.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "bulwark.labels" -}}
{{ include "bulwark.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: bulwark
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "bulwark.chart" . }}
{{- end -}}

{{- define "bulwark.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "bulwark.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{- define "bulwark.tlsSecretName" -}}
{{- .Values.tls.existingSecret | default (printf "%s-tls" (include "bulwark.fullname" .)) -}}
{{- end -}}

{{- define "bulwark.image" -}}
{{- printf "%s:%s" .repository (.tag | default .appVersion) -}}
{{- end -}}

{{- define "bulwark.operatorImage" -}}
{{- include "bulwark.image" (dict "repository" .Values.image.repository "tag" .Values.image.tag "appVersion" .Chart.AppVersion) -}}
{{- end -}}

{{- define "bulwark.sidecarImage" -}}
{{- include "bulwark.image" (dict "repository" .Values.sidecar.image.repository "tag" .Values.sidecar.image.tag "appVersion" .Chart.AppVersion) -}}
{{- end -}}

{{/* The DNS names the certificate covers: the config stream's Service, then the webhook's. */}}
{{- define "bulwark.dnsNames" -}}
{{- $ns := .Release.Namespace -}}
{{- $names := list -}}
{{- range $svc := list (include "bulwark.fullname" .) (include "bulwark.webhookService" .) -}}
{{- $names = concat $names (list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns $.Values.clusterDomain)) -}}
{{- end -}}
{{- $names | toJson -}}
{{- end -}}

{{/* The Service of the sidecar injection webhook (every replica answers it). */}}
{{- define "bulwark.webhookService" -}}
{{- printf "%s-webhook" (include "bulwark.fullname" .) -}}
{{- end -}}
