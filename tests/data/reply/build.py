# ruff: noqa: RUF001  (fullwidth punctuation is the data)
"""Writes labelled.jsonl: the labelled set for the `reply` processor (run to rebuild).

Each line is one message: ``id``, ``lang``, ``style``, ``raw`` (the RFC 5322 message as
text) and ``expected`` (the new text of the reply, signature and quoted history gone).
The messages are written from the quoting styles of real clients (Gmail, Outlook,
Apple Mail, Thunderbird, QQ Mail, mobile footers) in seven languages; the set is
synthetic and deterministic, so the expected text is exact by construction.
"""

from __future__ import annotations

import json
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

HERE = Path(__file__).parent

# lang: replies (2), quoted history, person, gmail header, wrapped gmail header,
# outlook labels (from, sent, to, subject), original-message separator, mobile footer
LANGS: dict[str, dict[str, object]] = {
    "en": {
        "replies": [
            "Hi Anna,\n\nthe invoice is attached again. The VAT number was wrong.\n\nThanks,\nTom",
            "Hello,\n\nI still cannot log in after the password reset.\nThe error says: account locked.\n\nBest regards\nMaria",
        ],
        "history": "Dear customer,\n\nplease send us the corrected invoice.\n\nKind regards\nSupport Team",
        "person": "Anna Miller <anna@support.example>",
        "gmail": "On Mon, Jan 8, 2024 at 10:15 AM {p} wrote:",
        "gmail_wrap": "On Mon, Jan 8, 2024 at 10:15 AM Anna Miller <\nanna@support.example> wrote:",
        "outlook": ("From", "Sent", "To", "Subject", "Monday, January 8, 2024 10:15 AM"),
        "original": "-----Original Message-----",
        "mobile": "Sent from my iPhone",
        "trap": "From: the billing page I get a blank screen.",
    },
    "de": {
        "replies": [
            "Hallo Anna,\n\nanbei nochmals die Rechnung. Die USt-IdNr. war falsch.\n\nDanke,\nTom",
            "Guten Tag,\n\nich kann mich nach dem Zurücksetzen immer noch nicht anmelden.\nFehlermeldung: Konto gesperrt.\n\nMit freundlichen Grüßen\nMaria",
        ],
        "history": "Sehr geehrte Kundin,\n\nbitte senden Sie uns die korrigierte Rechnung.\n\nFreundliche Grüße\nIhr Support-Team",
        "person": "Anna Müller <anna@support.example>",
        "gmail": "Am Mo., 8. Jan. 2024 um 10:15 Uhr schrieb {p}:",
        "gmail_wrap": "Am Mo., 8. Jan. 2024 um 10:15 Uhr schrieb Anna Müller <\nanna@support.example>:",
        "outlook": ("Von", "Gesendet", "An", "Betreff", "Montag, 8. Januar 2024 10:15"),
        "original": "-----Ursprüngliche Nachricht-----",
        "mobile": "Von meinem iPhone gesendet",
        "trap": "Von: der Startseite aus sehe ich nur eine weiße Seite.",
    },
    "fr": {
        "replies": [
            "Bonjour Anne,\n\nvoici de nouveau la facture. Le numéro de TVA était faux.\n\nMerci,\nThomas",
            "Bonjour,\n\nje ne peux toujours pas me connecter après la réinitialisation.\nLe message dit : compte verrouillé.\n\nCordialement\nMarie",
        ],
        "history": "Chère cliente,\n\nmerci de nous renvoyer la facture corrigée.\n\nCordialement\nL'équipe support",
        "person": "Anne Martin <anne@support.example>",
        "gmail": "Le lun. 8 janv. 2024 à 10:15, {p} a écrit :",
        "gmail_wrap": "Le lun. 8 janv. 2024 à 10:15, Anne Martin <anne@support.example> a\nécrit :",
        "outlook": ("De", "Envoyé", "À", "Objet", "lundi 8 janvier 2024 10:15"),
        "original": "-----Message d'origine-----",
        "mobile": "Envoyé de mon iPhone",
        "trap": "De : la page de facturation je vois un écran blanc.",
    },
    "es": {
        "replies": [
            "Hola Ana,\n\nadjunto de nuevo la factura. El NIF era incorrecto.\n\nGracias,\nTomás",
            "Buenos días,\n\nsigo sin poder entrar después de cambiar la contraseña.\nEl error dice: cuenta bloqueada.\n\nSaludos cordiales\nMaría",
        ],
        "history": "Estimada clienta,\n\npor favor envíenos la factura corregida.\n\nAtentamente\nEquipo de soporte",
        "person": "Ana García <ana@support.example>",
        "gmail": "El lun, 8 ene 2024 a las 10:15, {p} escribió:",
        "gmail_wrap": "El lun, 8 ene 2024 a las 10:15, Ana García (<\nana@support.example>) escribió:",
        "outlook": ("De", "Enviado", "Para", "Asunto", "lunes, 8 de enero de 2024 10:15"),
        "original": "-----Mensaje original-----",
        "mobile": "Enviado desde mi iPhone",
        "trap": "De: la página de pago sale en blanco.",
    },
    "pt": {
        "replies": [
            "Olá Ana,\n\nsegue novamente a fatura. O NIF estava errado.\n\nObrigado,\nTomás",
            "Bom dia,\n\nainda não consigo entrar depois de redefinir a senha.\nO erro diz: conta bloqueada.\n\nAtenciosamente\nMaria",
        ],
        "history": "Prezada cliente,\n\npor favor envie a fatura corrigida.\n\nAtenciosamente\nEquipe de suporte",
        "person": "Ana Souza <ana@support.example>",
        "gmail": "Em seg., 8 de jan. de 2024 às 10:15, {p} escreveu:",
        "gmail_wrap": "Em seg., 8 de jan. de 2024 às 10:15, Ana Souza <\nana@support.example> escreveu:",
        "outlook": ("De", "Enviado", "Para", "Assunto", "segunda-feira, 8 de janeiro de 2024 10:15"),
        "original": "-----Mensagem original-----",
        "mobile": "Enviado do meu iPhone",
        "trap": "De: a página de pagamento fica em branco.",
    },
    "ja": {
        "replies": [
            "山田様\n\n請求書を再送いたします。登録番号が誤っておりました。\n\nよろしくお願いいたします。\n田中",
            "お世話になっております。\n\nパスワード再設定後もログインできません。\nエラー表示：アカウントがロックされています。\n\n鈴木",
        ],
        "history": "お客様\n\n修正した請求書をお送りください。\n\nサポートチーム",
        "person": "山田 花子 <hanako@support.example>",
        "gmail": "2024年1月8日(月) 10:15 {p}:",
        "gmail_wrap": "2024/01/08 10:15、山田 花子 <hanako@support.example> のメッセージ:",
        "outlook": ("差出人", "送信日時", "宛先", "件名", "2024年1月8日 月曜日 10:15"),
        "original": "-----Original Message-----",
        "mobile": "iPhoneから送信",
        "trap": "差出人の欄が空欄になっています。",
    },
    "zh": {
        "replies": [
            "王先生：\n\n发票已重新附上。税号之前填错了。\n\n谢谢\n张伟",
            "您好，\n\n重置密码后我仍然无法登录。\n错误提示：账户已锁定。\n\n此致\n李娜",
        ],
        "history": "尊敬的客户：\n\n请将更正后的发票发给我们。\n\n客服团队",
        "person": "王芳 <fang@support.example>",
        "gmail": "在 2024年1月8日 10:15，{p} 写道：",
        "gmail_wrap": "{p} 于2024年1月8日周一 10:15写道：",
        "outlook": ("发件人", "发送时间", "收件人", "主题", "2024年1月8日 10:15"),
        "original": "------------------ 原始邮件 ------------------",
        "mobile": "发自我的iPhone",
        "trap": "发件人一栏显示为空。",
    },
}

SUBJECT = {"en": "Invoice", "de": "Rechnung", "fr": "Facture", "es": "Factura",
           "pt": "Fatura", "ja": "請求書", "zh": "发票"}
SIGNATURE = "-- \n{name}\nExample GmbH | +49 30 1234567"


def _quote(text: str) -> str:
    return "\n".join(("> " + line) if line else ">" for line in text.split("\n"))


def _outlook(lang: dict[str, object], sep: str = "", colon: str = ": ") -> str:
    f, s, t, subj, date = lang["outlook"]  # type: ignore[misc]
    head = f"{sep}\n" if sep else ""
    return (
        f"{head}{f}{colon}{lang['person']}\n{s}{colon}{date}\n"
        f"{t}{colon}Kunde <kunde@customer.example>\n{subj}{colon}{SUBJECT_CUR}\n\n"
        f"{lang['history']}"
    )


SUBJECT_CUR = ""


def _plain_cases(code: str, lang: dict[str, object], reply: str, name: str) -> list[tuple[str, str, str]]:
    """(style, body, expected) for text/plain messages."""
    hist = str(lang["history"])
    person = str(lang["person"])
    gmail = str(lang["gmail"]).format(p=person)
    wrap = str(lang["gmail_wrap"]).format(p=person)
    colon = " : " if code == "fr" else ("：" if code in ("zh",) else ": ")
    sig = SIGNATURE.format(name=name)
    return [
        ("gmail", f"{reply}\n\n{gmail}\n\n{_quote(hist)}\n", reply),
        ("gmail_wrapped", f"{reply}\n\n{wrap}\n{_quote(hist)}\n", reply),
        ("outlook_block", f"{reply}\n\n{_outlook(lang, colon=colon)}\n", reply),
        ("original_separator", f"{reply}\n\n{lang['original']}\n{_outlook(lang)}\n", reply),
        ("outlook_underscores", f"{reply}\n\n{'_' * 32}\n{_outlook(lang)}\n", reply),
        ("bare_quote", f"{reply}\n\n{_quote(hist)}\n", reply),
        ("signature_then_quote", f"{reply}\n\n{sig}\n\n{gmail}\n{_quote(hist)}\n", reply),
        ("mobile_footer", f"{reply}\n\n{lang['mobile']}\n\n{gmail}\n\n{_quote(hist)}\n", reply),
        ("signature_only", f"{reply}\n\n{sig}\n", reply),
        ("no_quote", f"{reply}\n", reply),
        ("trap_label_in_text", f"{lang['trap']}\n\n{reply}\n\n{gmail}\n{_quote(hist)}\n",
         f"{lang['trap']}\n\n{reply}"),
    ]


def _html(text: str) -> str:
    return "<br>\n".join(text.split("\n"))


def _html_cases(code: str, lang: dict[str, object], reply: str) -> list[tuple[str, str, str]]:
    hist = str(lang["history"])
    person = str(lang["person"]).replace("<", "&lt;").replace(">", "&gt;")
    gmail = str(lang["gmail"]).format(p=person)
    f, s, t, subj, date = lang["outlook"]  # type: ignore[misc]
    return [
        ("html_gmail_quote",
         f'<div dir="ltr">{_html(reply)}</div><br><div class="gmail_quote">'
         f'<div dir="ltr" class="gmail_attr">{gmail}<br></div>'
         f'<blockquote class="gmail_quote" style="margin:0px 0px 0px 0.8ex">'
         f"{_html(hist)}</blockquote></div>", reply),
        ("html_outlook_divrplyfwdmsg",
         f"<html><body><div>{_html(reply)}</div><hr style=\"display:inline-block\">"
         f'<div id="divRplyFwdMsg" dir="ltr"><b>{f}:</b> {person}<br><b>{s}:</b> {date}'
         f"<br><b>{t}:</b> Kunde<br><b>{subj}:</b> {SUBJECT[code]}</div>"
         f"<div>{_html(hist)}</div></body></html>", reply),
        ("html_blockquote_cite",
         f"<html><body><p>{_html(reply)}</p><p>{gmail}</p>"
         f'<blockquote type="cite">{_html(hist)}</blockquote></body></html>', reply),
        ("html_no_quote", f"<html><body><p>{_html(reply)}</p></body></html>", reply),
        ("html_moz_cite_prefix",
         f'<html><body><p>{_html(reply)}</p><div class="moz-cite-prefix">{gmail}</div>'
         f'<blockquote type="cite" cite="mid:abc@example">{_html(hist)}</blockquote>'
         "</body></html>", reply),
        ("html_appendonsend",
         f'<html><body><div>{_html(reply)}</div><div id="appendonsend"></div>'
         f"<hr><div><b>{f}:</b> {person}<br><b>{s}:</b> {date}</div>"
         f"<div>{_html(hist)}</div></body></html>", reply),
        ("html_signature_div",
         f'<html><body><div>{_html(reply)}</div><div class="gmail_signature">'
         f"-- <br>Tom<br>Example GmbH</div><br><div class=\"gmail_quote\">{gmail}"
         f"<blockquote>{_html(hist)}</blockquote></div></body></html>", reply),
    ]


def _message(i: int, code: str, style: str, body: str, html: bool) -> str:
    msg = EmailMessage()
    msg["From"] = "Kunde <kunde@customer.example>"
    msg["To"] = "support@support.example"
    msg["Subject"] = f"Re: [#{1000 + i}] {SUBJECT[code]}"
    msg["Message-ID"] = f"<reply-{i}@customer.example>"
    msg["In-Reply-To"] = f"<ticket-{1000 + i}@support.example>"
    msg["Date"] = "Mon, 08 Jan 2024 11:00:00 +0000"
    if html:
        msg.set_content(body, subtype="html", charset="utf-8", cte="quoted-printable")
    elif code == "ja" and i % 3 == 0:
        msg.set_content(body, charset="iso-2022-jp", cte="7bit")
    else:
        msg.set_content(body, charset="utf-8", cte="quoted-printable" if i % 2 else "base64")
    return msg.as_bytes(policy=SMTP).decode("ascii")


def build() -> list[dict[str, str]]:
    """Return the labelled set, in a fixed order."""
    global SUBJECT_CUR
    rows: list[dict[str, str]] = []
    for code, lang in LANGS.items():
        SUBJECT_CUR = SUBJECT[code]
        replies = lang["replies"]
        assert isinstance(replies, list)
        for n, reply in enumerate(replies):
            name = reply.rsplit("\n", 1)[-1]
            cases = [(s, b, e, False) for s, b, e in _plain_cases(code, lang, reply, name)]
            if n == 0:
                cases += [(s, b, e, True) for s, b, e in _html_cases(code, lang, reply)]
            else:  # half the HTML styles per reply keeps the set balanced
                cases += [(s, b, e, True) for s, b, e in _html_cases(code, lang, reply)[:4]]
            for style, body, expected, html in cases:
                i = len(rows)
                rows.append({
                    "id": f"{code}-{n}-{style}",
                    "lang": code,
                    "style": style,
                    "raw": _message(i, code, style, body, html),
                    "expected": expected,
                })
    return rows


if __name__ == "__main__":
    rows = build()
    with (HERE / "labelled.jsonl").open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(len(rows), "messages")
